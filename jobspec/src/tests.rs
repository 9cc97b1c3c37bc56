//! The job spec's tests: parsing, defaults, and every error naming its field.
use super::*;

const GOOD: &str = r#"
name = "shakespeare"
priority = 3
max_restarts = 2

[model]
preset = "tiny"

[data]
text = "data/tinyshakespeare.txt"

[train]
steps = 100
global_batch = 16
micro_batch = 4
seq_len = 64
lr = 1e-3

[cluster]
world_size = 2
"#;

#[test]
fn parses_a_good_spec_with_defaults() {
    let s = JobSpec::parse(GOOD).unwrap();
    assert_eq!(s.priority, 3);
    assert_eq!(s.grad_accum(), 2);
    assert_eq!(s.data.tokenizer, "char");
    assert_eq!(s.seed, 1337);
    assert_eq!(s.train_config().schedule.min_lr, 1e-3 / 10.0);
    assert_eq!(s.model_config(65).unwrap().vocab_size, 65);
    let mut padded = s.clone();
    padded.model.pad_vocab_to = Some(64);
    assert_eq!(padded.model_config(65).unwrap().vocab_size, 128);
    assert_eq!(padded.model_config(50257).unwrap().vocab_size, 50304, "nanoGPT's padding");
    assert_eq!(padded.model_config(128).unwrap().vocab_size, 128);
    padded.model.pad_vocab_to = Some(0);
    assert_eq!(padded.model_config(65).unwrap_err().field, "model.pad_vocab_to");
    // A GPT's positions: learned (default) or rotary; anything else names the field.
    assert_eq!(s.model_config(65).unwrap().positions, GptPositions::Learned);
    let rotary = JobSpec::parse(&GOOD.replace("preset = \"tiny\"", "preset = \"tiny\"\npositions = \"rotary\"")).unwrap();
    assert_eq!(rotary.model_config(65).unwrap().positions, GptPositions::Rotary);
    let e = JobSpec::parse(&GOOD.replace("preset = \"tiny\"", "preset = \"tiny\"\npositions = \"sinusoidal\"")).unwrap_err();
    assert_eq!(e.field, "model.positions");
    assert!(e.message.contains("learned, rotary"), "{}", e.message);
    let bert = GOOD.replace("preset = \"tiny\"", "arch = \"bert\"\npreset = \"bert-test\"\npad_vocab_to = 64");
    assert_eq!(JobSpec::parse(&bert).unwrap_err().field, "model.pad_vocab_to");
    // Round trip through TOML.
    assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s);
}

#[test]
fn unknown_field_is_named() {
    let e = JobSpec::parse(&GOOD.replace("lr = 1e-3", "lr = 1e-3\nlearning_rate = 2")).unwrap_err();
    assert_eq!(e.field, "train.learning_rate", "{e}");
    assert!(e.message.contains("unknown field"), "{e}");
}

#[test]
fn indivisible_global_batch_is_explained() {
    let e = JobSpec::parse(&GOOD.replace("global_batch = 16", "global_batch = 12")).unwrap_err();
    assert_eq!(e.field, "train.global_batch");
    assert!(e.message.contains("2 x 4 = 8"), "{e}");
}

#[test]
fn model_and_train_errors_carry_their_table() {
    let e = JobSpec::parse(&GOOD.replace("preset = \"tiny\"", "preset = \"huge\"")).unwrap_err();
    assert_eq!(e.field, "model.preset");
    let e = JobSpec::parse(&GOOD.replace("seq_len = 64", "seq_len = 4096")).unwrap_err();
    assert_eq!(e.field, "train.seq_len", "{e}");
    let e = JobSpec::parse(&GOOD.replace("lr = 1e-3", "lr = -1.0")).unwrap_err();
    assert_eq!(e.field, "train.lr", "{e}");
    let e = JobSpec::parse(&GOOD.replace("[cluster]\nworld_size = 2", "[cluster]\nworld_size = 2\ndevice = \"tpu\"")).unwrap_err();
    assert!(e.message.contains("tpu") || e.field.contains("tpu"), "{e}");
}

#[test]
fn grad_bucket_size_is_optional_and_checked() {
    let s = JobSpec::parse(GOOD).unwrap();
    assert_eq!(s.grad_bucket_floats(), None);
    let on = JobSpec::parse(&GOOD.replace("[cluster]\nworld_size = 2", "[cluster]\nworld_size = 2\ngrad_bucket_mb = 25")).unwrap();
    assert_eq!(on.grad_bucket_floats(), Some(25 * 1024 * 1024 / 4));
    let off = JobSpec::parse(&GOOD.replace("[cluster]\nworld_size = 2", "[cluster]\nworld_size = 2\ngrad_bucket_mb = 0")).unwrap();
    assert_eq!(off.grad_bucket_floats(), Some(0));
    assert_eq!(JobSpec::parse(&on.to_toml()).unwrap(), on, "round trip");
    for bad in ["-1", "5000", "nan"] {
        let e = JobSpec::parse(&GOOD.replace("[cluster]\nworld_size = 2", &format!("[cluster]\nworld_size = 2\ngrad_bucket_mb = {bad}"))).unwrap_err();
        assert_eq!(e.field, "cluster.grad_bucket_mb", "{bad}: {e}");
    }
}

#[test]
fn data_needs_exactly_one_source() {
    let both = GOOD.replace("text = \"data/tinyshakespeare.txt\"", "text = \"a.txt\"\ncorpus = \"s3://b/c\"");
    assert_eq!(JobSpec::parse(&both).unwrap_err().field, "data.corpus");
    let none = GOOD.replace("text = \"data/tinyshakespeare.txt\"", "");
    assert_eq!(JobSpec::parse(&none).unwrap_err().field, "data.text");
    let corpus = GOOD.replace("text = \"data/tinyshakespeare.txt\"", "corpus = \"file:///data/c\"");
    assert_eq!(JobSpec::parse(&corpus).unwrap().data.corpus.as_deref(), Some("file:///data/c"));
    // a text's settings beside a corpus or a mixture: refused, not ignored
    for (extra, field) in [("tokenizer = \"gpt2\"", "data.tokenizer"), ("val_fraction = 0.5", "data.val_fraction")] {
        let with = corpus.replace("corpus = \"file:///data/c\"", &format!("corpus = \"file:///data/c\"\n{extra}"));
        let e = JobSpec::parse(&with).unwrap_err();
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains("a prepared corpus has its own"), "{e}");
    }
    let mix = GOOD.replace(
        "[data]\ntext = \"data/tinyshakespeare.txt\"",
        "[data]\ntokenizer = \"char\"\n[[data.mix]]\ncorpus = \"s3://b/web\"\nweight = 1.0",
    );
    assert!(mix.contains("[[data.mix]]"), "{mix}");
    assert_eq!(JobSpec::parse(&mix).unwrap_err().field, "data.tokenizer");
}

#[test]
fn missing_section_and_bad_syntax_are_reported() {
    // a missing table is named as the field it is, and the message says it is required
    let e = JobSpec::parse("name = \"x\"\n").unwrap_err();
    assert!(!e.field.is_empty() && e.field != "toml" && e.message.contains("required"), "{e}");
    assert_eq!(e.to_string(), format!("job spec: `{}`: required, and not in the spec", e.field));
    // a syntax error is its message and line, with no field to name
    let e = JobSpec::parse("name = \n").unwrap_err();
    assert!(!e.message.is_empty() && e.to_string().starts_with("job spec: ") && !e.to_string().contains("`toml`"), "{e}");
}

#[test]
fn checkpoint_section_has_defaults_and_checks() {
    let s = JobSpec::parse(GOOD).unwrap();
    assert_eq!(s.checkpoint, CheckpointSpec::default());
    assert_eq!((s.checkpoint.every, s.checkpoint.keep_last), (0, 3));
    let with = format!("{GOOD}\n[checkpoint]\nevery = 50\nkeep_every = 1000\nstore = \"s3://b/runs\"\n");
    let s = JobSpec::parse(&with).unwrap();
    assert_eq!((s.checkpoint.every, s.checkpoint.keep_every), (50, 1000));
    assert_eq!(s.checkpoint.store.as_deref(), Some("s3://b/runs"));
    assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s);
    let e = JobSpec::parse(&format!("{GOOD}\n[checkpoint]\nkeep_last = 0\n")).unwrap_err();
    assert_eq!(e.field, "checkpoint.keep_last", "{e}");
    let e = JobSpec::parse(&format!("{GOOD}\n[checkpoint]\nevry = 5\n")).unwrap_err();
    assert!(e.message.contains("unknown field"), "{e}");
}

const FINETUNE: &str = r#"
name = "sentiment"
kind = "finetune"

[finetune]
init_from = "job-000003"
head = "classification"
num_labels = 2
data = "data/reviews.jsonl"

[train]
steps = 50
global_batch = 8
micro_batch = 8
seq_len = 64
lr = 1e-4
"#;

#[test]
fn finetune_spec_parses_without_model_or_data() {
    let s = JobSpec::parse(FINETUNE).unwrap();
    assert_eq!(s.kind, JobKind::Finetune);
    let f = s.finetune.as_ref().unwrap();
    assert_eq!(f.head_kind().unwrap(), FinetuneHead::Classification);
    assert_eq!((f.num_labels, f.val_fraction(), f.val_data.as_deref()), (Some(2), 0.1, None));
    assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s);
    // A pretraining spec still round-trips without a [finetune] table.
    assert!(!JobSpec::parse(GOOD).unwrap().to_toml().contains("finetune"));
    let sft = FINETUNE.replace("head = \"classification\"\nnum_labels = 2", "head = \"sft\"");
    assert_eq!(JobSpec::parse(&sft).unwrap().finetune.unwrap().head_kind().unwrap(), FinetuneHead::Sft);
}

#[test]
fn finetune_errors_name_the_field() {
    let field = |text: String| JobSpec::parse(&text).unwrap_err().field;
    assert_eq!(field(FINETUNE.replace("init_from = \"job-000003\"", "init_from = \" \"")), "finetune.init_from");
    assert_eq!(field(FINETUNE.replace("head = \"classification\"", "head = \"regression\"")), "finetune.head");
    assert_eq!(field(FINETUNE.replace("num_labels = 2", "")), "finetune.num_labels");
    assert_eq!(field(FINETUNE.replace("num_labels = 2", "num_labels = 1")), "finetune.num_labels");
    assert_eq!(field(FINETUNE.replace("num_labels = 2", "num_labels = 4294967295")), "finetune.num_labels");
    assert_eq!(field(FINETUNE.replace("head = \"classification\"", "head = \"sft\"")), "finetune.num_labels");
    assert_eq!(field(FINETUNE.replace("data = \"data/reviews.jsonl\"", "data = \"\"")), "finetune.data");
    assert_eq!(field(FINETUNE.replace("num_labels = 2", "num_labels = 2\nval_fraction = 1.5")), "finetune.val_fraction");
    // a held-out share means nothing beside a validation file: refused, not ignored
    assert_eq!(field(FINETUNE.replace("num_labels = 2", "num_labels = 2\nval_fraction = 0.2\nval_data = \"v.jsonl\"")), "finetune.val_fraction");
    assert!(JobSpec::parse(&FINETUNE.replace("num_labels = 2", "num_labels = 2\nval_data = \"v.jsonl\"")).is_ok());
    assert_eq!(field(FINETUNE.replace("[train]", "[model]\npreset = \"tiny\"\n\n[train]")), "model.preset");
    assert_eq!(field(FINETUNE.replace("[train]", "[model]\npositions = \"rotary\"\n\n[train]")), "model.positions");
    // every other [model] field too: each was accepted and ignored (the parent's dropout ran)
    for given in ["dropout = 0.5", "mask_prob = 0.9", "objective = \"mlm\"", "scores = \"additive\"", "noise_density = 0.3"] {
        let e = JobSpec::parse(&FINETUNE.replace("[train]", &format!("[model]\n{given}\n\n[train]"))).unwrap_err();
        assert_eq!(e.field, format!("model.{}", given.split(' ').next().unwrap()), "{given}");
        assert!(e.message.starts_with("a finetune job takes its model from finetune.init_from"), "{e}");
    }
    assert_eq!(field(FINETUNE.replace("[train]", "[data]\ntext = \"a.txt\"\n\n[train]")), "data.text");
    assert_eq!(field(FINETUNE.replace("lr = 1e-4", "lr = 0.0")), "train.lr");
    let start = FINETUNE.find("[finetune]").unwrap();
    let end = FINETUNE.find("[train]").unwrap();
    let no_table = format!("{}{}", &FINETUNE[..start], &FINETUNE[end..]);
    assert_eq!(field(no_table), "finetune");
    // A [finetune] table on a pretraining job is refused rather than ignored.
    assert_eq!(field(format!("{GOOD}\n[finetune]\ninit_from = \"x\"\nhead = \"sft\"\ndata = \"d\"\n")), "finetune");
}

#[test]
fn the_gpt_examples_parse() {
    for (name, text) in [
        ("shakespeare-char", include_str!("../../examples/shakespeare-char.toml")),
        ("shakespeare-char-gpu", include_str!("../../examples/shakespeare-char-gpu.toml")),
        ("finetune-classify", include_str!("../../examples/finetune-classify.toml")),
        ("pretrain-mix", include_str!("../../examples/pretrain-mix.toml")),
    ] {
        JobSpec::parse(text).unwrap_or_else(|e| panic!("examples/{name}.toml: {e}"));
    }
    // the GPU example keeps its vocabulary: the LM head's rows are rounded up by the model
    let gpu = JobSpec::parse(include_str!("../../examples/shakespeare-char-gpu.toml")).unwrap();
    let cfg = gpu.model_config(65).unwrap();
    assert_eq!((cfg.vocab_size, cfg.head_rows()), (65, 128));
}

/// Sizes no machine could hold are refused naming the field (the worker would abort on the
/// allocation): the engine configs' upper bounds.
#[test]
fn absurd_model_sizes_are_refused_naming_the_field() {
    for (from, to, field, says) in [
        ("preset = \"tiny\"", "n_layer = 2\nn_head = 2\nn_embd = 4294967296\nblock_size = 64", "model.n_embd", "4294967296 is more than 65536"),
        ("preset = \"tiny\"", "n_layer = 100000\nn_head = 2\nn_embd = 64\nblock_size = 64", "model.n_layer", "100000 is more than 1024"),
        ("preset = \"tiny\"", "n_layer = 2\nn_head = 2\nn_embd = 64\nblock_size = 1099511627776", "model.block_size", "is more than 1048576"),
    ] {
        let e = JobSpec::parse(&GOOD.replace(from, to)).unwrap_err();
        assert_eq!(e.field, field, "{}", e.message);
        assert!(e.message.contains(says), "{}", e.message);
    }
}

#[test]
fn a_vocab_size_is_refused_naming_where_the_vocabulary_comes_from() {
    for (arch, pad) in [("", true), ("arch = \"bert\"\n", false)] {
        let spec = GOOD.replace("preset = \"tiny\"", &format!("{arch}preset = \"tiny\"\nvocab_size = 10"));
        let e = JobSpec::parse(&spec).unwrap_err();
        assert_eq!(e.field, "model.vocab_size", "{arch}: {}", e.message);
        assert!(e.message.contains("10: the vocabulary is the tokenizer's"), "{}", e.message);
        assert_eq!(e.message.contains("pad_vocab_to"), pad, "{}", e.message);
    }
}

#[test]
fn init_from_takes_the_model_from_the_file() {
    let base = GOOD.replace("preset = \"tiny\"", "init_from = \"models/gpt2.safetensors\"");
    let s = JobSpec::parse(&base).unwrap();
    assert_eq!(s.model.init_from.as_deref(), Some("models/gpt2.safetensors"));
    // the stored spec keeps it
    assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s);
    // a sequence longer than any preset's block size is the worker's to check (it reads the file)
    assert!(JobSpec::parse(&base.replace("seq_len = 64", "seq_len = 1024")).is_ok());
    for (line, field) in [
        ("preset = \"tiny\"", "model.preset"),
        ("n_layer = 2", "model.n_layer"),
        ("n_embd = 64", "model.n_embd"),
        ("block_size = 64", "model.block_size"),
        ("vocab_size = 300", "model.vocab_size"),
        ("pad_vocab_to = 64", "model.pad_vocab_to"),
        ("positions = \"rotary\"", "model.positions"),
        ("ln_placement = \"post\"", "model.ln_placement"),
    ] {
        let spec = base.replace("init_from =", &format!("{line}\ninit_from ="));
        assert_eq!(JobSpec::parse(&spec).unwrap_err().field, field, "{line}");
    }
    let empty = base.replace("\"models/gpt2.safetensors\"", "\" \"");
    assert_eq!(JobSpec::parse(&empty).unwrap_err().field, "model.init_from");
    let bert = base.replace("init_from =", "arch = \"bert\"\ninit_from =");
    let e = JobSpec::parse(&bert).unwrap_err();
    assert_eq!(e.field, "model.init_from");
    assert!(e.message.contains("only for arch = \"gpt\""), "{}", e.message);
    // the training settings are still checked
    assert_eq!(JobSpec::parse(&base.replace("lr = 1e-3", "lr = -1.0")).unwrap_err().field, "train.lr");
    // GPT-2's tokenizer over a text file (a model imported from the Hub uses it)
    let gpt2 = base.replace("[data]\n", "[data]\ntokenizer = \"gpt2\"\n");
    assert_eq!(JobSpec::parse(&gpt2).unwrap().data.tokenizer, "gpt2");
    let bert_gpt2 = GOOD.replace("preset = \"tiny\"", "arch = \"bert\"\npreset = \"bert-tiny\"").replace("[data]\n", "[data]\ntokenizer = \"gpt2\"\n");
    assert_eq!(JobSpec::parse(&bert_gpt2).unwrap_err().field, "data.tokenizer");
}

#[test]
fn a_finetune_job_refuses_model_init_from() {
    let ft = r#"
name = "ft"
kind = "finetune"
[model]
init_from = "a.safetensors"
[finetune]
init_from = "b.safetensors"
head = "sft"
data = "d.jsonl"
[train]
steps = 1
global_batch = 2
micro_batch = 2
seq_len = 8
lr = 1e-3
"#;
    let e = JobSpec::parse(ft).unwrap_err();
    assert_eq!(e.field, "model.init_from");
    assert!(e.message.contains("finetune.init_from"), "{}", e.message);
    assert!(JobSpec::parse(&ft.replace("[model]\ninit_from = \"a.safetensors\"\n", "")).is_ok());
}

#[test]
fn a_data_mix_names_its_corpora_and_weights() {
    let mix = GOOD.replace(
        "[data]\ntext = \"data/tinyshakespeare.txt\"\n",
        "[[data.mix]]\ncorpus = \"s3://b/web\"\nweight = 0.75\n[[data.mix]]\ncorpus = \"file:///data/code\"\nweight = 0.25\n",
    );
    let s = JobSpec::parse(&mix).unwrap();
    assert_eq!(s.data.mix.len(), 2);
    assert_eq!((s.data.mix[1].corpus.as_str(), s.data.mix[1].weight), ("file:///data/code", 0.25));
    assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s, "the stored spec keeps the mixture");
    // global_batch 16: a weight of 0.05 of 1.0 gives 0.8 sequences a step
    let tiny = mix.replace("weight = 0.75", "weight = 0.95").replace("weight = 0.25", "weight = 0.05");
    let e = JobSpec::parse(&tiny).unwrap_err();
    assert_eq!(e.field, "data.mix[1].weight");
    assert!(e.message.contains("0.800 of the 16 sequences"), "{}", e.message);
    assert_eq!(JobSpec::parse(&mix.replace("weight = 0.25", "weight = 0.0")).unwrap_err().field, "data.mix[1].weight");
    assert_eq!(JobSpec::parse(&mix.replace("weight = 0.25", "weight = -1.0")).unwrap_err().field, "data.mix[1].weight");
    assert_eq!(JobSpec::parse(&mix.replace("\"s3://b/web\"", "\"\"")).unwrap_err().field, "data.mix[0].corpus");
    let both = mix.replace("[[data.mix]]\ncorpus = \"s3://b/web\"", "[data]\ncorpus = \"s3://b/c\"\n[[data.mix]]\ncorpus = \"s3://b/web\"");
    assert_eq!(JobSpec::parse(&both).unwrap_err().field, "data.corpus");
    let bert = mix.replace("preset = \"tiny\"", "arch = \"bert\"\npreset = \"bert-tiny\"");
    assert_eq!(JobSpec::parse(&bert).unwrap_err().field, "data.mix");
    let unknown = mix.replace("weight = 0.25", "weight = 0.25\nshare = 2");
    assert!(JobSpec::parse(&unknown).is_err(), "unknown fields in a source are refused");
    // a corpus listed twice would be two sources of one name (metrics, events)
    let twice = JobSpec::parse(&mix.replace("\"file:///data/code\"", "\"s3://b/web\"")).unwrap_err();
    assert_eq!(twice.field, "data.mix[1].corpus");
    assert!(twice.message.contains("data.mix[0]'s too"), "{}", twice.message);
}

#[test]
fn the_schedule_is_named_and_checked() {
    let with = |extra: &str| GOOD.replace("lr = 1e-3\n", &format!("lr = 1e-3\n{extra}\n"));
    assert_eq!(JobSpec::parse(GOOD).unwrap().train_config().schedule.decay, LrDecay::Cosine);
    let wsd = JobSpec::parse(&with("schedule = \"wsd\"\ncooldown_steps = 30")).unwrap();
    let s = wsd.train_config().schedule;
    assert_eq!((s.decay, s.cooldown_steps), (LrDecay::Wsd, 30));
    assert_eq!(JobSpec::parse(&wsd.to_toml()).unwrap(), wsd);
    // default cooldown: a fifth of the steps
    assert_eq!(JobSpec::parse(&with("schedule = \"wsd\"")).unwrap().train_config().schedule.cooldown_steps, 20);
    // ... and never more than warm-up leaves (95 of 100 steps warm up: 5 left)
    let late = with("schedule = \"wsd\"\nwarmup_steps = 95");
    assert_eq!(JobSpec::parse(&late).unwrap().train_config().schedule.cooldown_steps, 5);
    assert_eq!(JobSpec::parse(&with("schedule = \"linear\"")).unwrap().train_config().schedule.decay, LrDecay::Linear);
    let e = JobSpec::parse(&with("schedule = \"step\"")).unwrap_err();
    assert_eq!(e.field, "train.schedule");
    assert!(e.message.contains("cosine, linear, constant, wsd"), "{}", e.message);
    assert_eq!(JobSpec::parse(&with("cooldown_steps = 5")).unwrap_err().field, "train.cooldown_steps");
    assert_eq!(JobSpec::parse(&with("schedule = \"wsd\"\ncooldown_steps = 101")).unwrap_err().field, "train.cooldown_steps");
    // a warm-up longer than the run (100 steps) is refused, naming the field; as long is accepted
    let e = JobSpec::parse(&with("warmup_steps = 101")).unwrap_err();
    assert_eq!(e.field, "train.warmup_steps");
    assert!(e.message.contains("101 is more than the run's 100 steps"), "{}", e.message);
    JobSpec::parse(&with("warmup_steps = 100")).unwrap();
    // a negative clip norm is refused (it once meant "no clipping" without a word); 0 is off
    let e = JobSpec::parse(&with("grad_clip = -1.0")).unwrap_err();
    assert_eq!(e.field, "train.grad_clip");
    assert!(e.message.contains("0 for no clipping"), "{}", e.message);
    assert_eq!(JobSpec::parse(&with("grad_clip = 0.0")).unwrap().train_config().optim.grad_clip, None);
}

#[test]
fn eval_choices_is_for_gpt_pretraining_and_round_trips() {
    let with = |extra: &str| GOOD.replace("lr = 1e-3\n", &format!("lr = 1e-3\n{extra}\n"));
    let s = JobSpec::parse(&with("eval_choices = \"s3://evals/hellaswag_val.jsonl\"\neval_choices_max = 500")).unwrap();
    assert_eq!((s.train.eval_choices.as_deref(), s.train.eval_choices_max), (Some("s3://evals/hellaswag_val.jsonl"), 500));
    assert_eq!(JobSpec::parse(&s.to_toml()).unwrap(), s);
    // left out of a spec without it (earlier coordinators read it back)
    assert!(!JobSpec::parse(GOOD).unwrap().to_toml().contains("eval_choices"));
    assert_eq!(JobSpec::parse(&with("eval_choices = \" \"")).unwrap_err().field, "train.eval_choices");
    assert_eq!(JobSpec::parse(&with("eval_choices_max = 5")).unwrap_err().field, "train.eval_choices_max");
    let bert = with("eval_choices = \"h.jsonl\"").replace("preset = \"tiny\"", "arch = \"bert\"\npreset = \"tiny\"");
    let e = JobSpec::parse(&bert).unwrap_err();
    assert_eq!(e.field, "train.eval_choices", "{}", e.message);
    assert!(e.message.contains("only for GPT pretraining"), "{}", e.message);
}
