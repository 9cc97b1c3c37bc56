//! `model.pad_vocab_to`: a GPT whose vocabulary is rounded up past its tokenizer's (as nanoGPT
//! pads GPT-2's 50,257 to 50,304) trains through the cluster, its model file and checkpoints
//! carry the padded size, its loss falls, the padding ids' logits fall below the real ones',
//! and `smelt sample` only ever writes the tokenizer's characters.

mod harness;

use harness::Cluster;
use smelt_engine::model::Gpt;
use smelt_engine::CpuBackend;
use smelt_proto::v1::JobState;

const LINE: &str = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n";

#[test]
fn a_gpt_with_a_padded_vocabulary_trains_and_samples_only_real_tokens() {
    let c = Cluster::with_workers(2);
    let text = c.dir.path().join("text.txt");
    std::fs::write(&text, LINE.repeat(40)).unwrap();
    let spec = format!(
        "name = \"padded\"\n[model]\npreset = \"test\"\npad_vocab_to = 64\n[data]\ntext = {:?}\n\
         [train]\nsteps = 60\nglobal_batch = 8\nmicro_batch = 4\nseq_len = 16\nlr = 3e-3\nwarmup_steps = 5\n\
         [cluster]\nworld_size = 2\n[checkpoint]\nevery = 30\n",
        text.to_str().unwrap()
    );
    let job = c.submit(&spec, "");
    let (state, metrics) = c.follow(&job.id);
    assert_eq!(state, JobState::Succeeded, "{}\n{}", c.job(&job.id).error, c.logs());
    let (first, last) = (metrics[0].loss, metrics.last().unwrap().loss);
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    // CPU ranks have no bf16 peak to measure against: no MFU is claimed for them.
    assert!(metrics.iter().all(|m| m.mfu.is_none()), "{:?}", metrics.last());

    let saved = smelt_worker::model_file::load(&c.model_path(&job.id)).unwrap();
    let real = saved.tokenizer.vocab_size();
    assert!(real < 64, "the char tokenizer of this text has {real} ids");
    assert_eq!(saved.config.vocab_size, 64, "{real} ids rounded up to a multiple of 64");
    let ck = smelt_checkpoint::load_verified(&c.job(&job.id).last_checkpoint_uri).unwrap();
    assert_eq!(ck.trainer.model.gpt().map(|g| g.vocab_size), Some(64));

    // Never targets, the padding ids end up less likely than every real one.
    let mut model = Gpt::from_params(CpuBackend::new(), saved.config.clone(), &saved.params).unwrap();
    let ids = saved.tokenizer.encode("the quick brown").unwrap();
    model.forward(&ids, None, 1, ids.len()).unwrap();
    let logits = model.logits_at(0, ids.len() - 1);
    let best_pad = logits[real..].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let best_real = logits[..real].iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    assert!(best_pad < best_real, "a padding logit {best_pad} beats every real one {best_real}");

    // Sampling at a high temperature writes only characters of the text.
    let (ok, out) = c.smelt(&["sample", "--model", c.model_path(&job.id).to_str().unwrap(), "--prompt", "the", "--tokens", "200", "--temperature", "3"]);
    assert!(ok, "{out}");
    let stray: Vec<char> = out.trim_end().chars().filter(|ch| !LINE.contains(*ch)).collect();
    assert!(stray.is_empty(), "sampled characters the tokenizer does not have: {stray:?}\n{out}");
}
