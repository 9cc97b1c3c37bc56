//! Warnings about a resume that does not continue its checkpoint's run as it was (allowed:
//! a deliberate change), logged to the job's warning target so that they are job events.

use smelt_checkpoint::Checkpoint;
use smelt_jobspec::JobSpec;
use tracing::warn;

/// A spec's data as a person reads it: `text a.txt (char)`, `corpus s3://b/web`, `mix s3://b/web
/// x0.8 + s3://b/code x0.2`.
fn data_in_words(d: &smelt_jobspec::DataSpec) -> String {
    if !d.mix.is_empty() {
        return format!("mix {}", d.mix.iter().map(|m| format!("{} x{}", m.corpus, m.weight)).collect::<Vec<_>>().join(" + "));
    }
    match (&d.text, &d.corpus) {
        (Some(t), _) => format!("text {t} ({}, val_fraction {})", d.tokenizer, d.val_fraction),
        (None, Some(c)) => format!("corpus {c}"),
        (None, None) => "none".to_string(),
    }
}

/// A resume under another seed, global batch or data (another text or corpus, a mixture with
/// other sources or weights) is allowed (a deliberate change) but does not continue the
/// checkpoint's sample order: say so.
pub fn warn_if_data_order_changes(ck: &Checkpoint, spec: &JobSpec) {
    if let Ok(then) = JobSpec::parse(&ck.trainer.spec_toml) {
        if then.data != spec.data {
            warn!(
                target: smelt_proto::JOB_WARNING_TARGET,
                uri = %ck.uri,
                checkpoint_data = %data_in_words(&then.data),
                data = %data_in_words(&spec.data),
                "resuming with other data than the checkpoint's job: the data order does not continue the checkpoint's"
            );
        }
        if let (Some(before), Some(now)) = (&then.finetune, &spec.finetune) {
            if (&before.data, &before.val_data) != (&now.data, &now.val_data) {
                warn!(
                    target: smelt_proto::JOB_WARNING_TARGET,
                    uri = %ck.uri,
                    checkpoint_data = %before.data,
                    data = %now.data,
                    "resuming with other examples than the checkpoint's job (finetune.data or val_data): the example order does not continue the checkpoint's"
                );
            }
            // the weights are the checkpoint's, which descend from its job's parent
            if before.init_from.trim() != now.init_from.trim() {
                warn!(
                    target: smelt_proto::JOB_WARNING_TARGET,
                    uri = %ck.uri,
                    checkpoint_parent = %before.init_from,
                    parent = %now.init_from,
                    "resuming under another finetune.init_from than the checkpoint's job: the weights are the checkpoint's, fine-tuned from its job's parent, not from this spec's"
                );
            }
        }
        // a longer run, another lr or schedule: allowed, but the learning rate at the resumed
        // step is not the one the checkpoint's run was at (a cosine over more steps jumps back up)
        let (before, now) = (then.train_config().schedule, spec.train_config().schedule);
        let step = ck.step();
        if before != now {
            warn!(
                target: smelt_proto::JOB_WARNING_TARGET,
                uri = %ck.uri,
                step,
                lr_then = %format!("{:.3e}", before.lr_at(step)),
                lr_now = %format!("{:.3e}", now.lr_at(step)),
                "resuming with another learning-rate schedule than the checkpoint's job (train.steps, lr, min_lr, warmup, schedule): the lr does not continue the checkpoint's"
            );
        }
    }
    let (seed, global) = (spec.seed, spec.train.global_batch as u64);
    if ck.trainer.data.seed != seed || ck.trainer.data.global_batch != global {
        warn!(
            target: smelt_proto::JOB_WARNING_TARGET,
            uri = %ck.uri,
            checkpoint_seed = ck.trainer.data.seed,
            checkpoint_global_batch = ck.trainer.data.global_batch,
            seed,
            global_batch = global,
            "resuming with another seed or global batch: the data order does not continue the checkpoint's"
        );
    }
}
