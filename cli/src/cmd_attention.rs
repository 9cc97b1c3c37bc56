//! `smelt attention`: a trained model's attention weights for one text, per layer and head, as
//! PNG heat maps (row = query token, column = key token, brighter = more weight, each row scaled
//! by its own largest weight) and as JSON (the weights themselves).
//!
//! GPT: causal self-attention, `layer<L>_head<H>.png`. BERT: bidirectional self-attention over
//! `[CLS] text [SEP]`, same file names. T5: the encoder's self-attention over the text
//! (`encoder_layer..`), and with the decoder fed `<pad> target` (`--target`, default the text
//! itself) its causal self-attention (`decoder_layer..`) and its cross-attention over the
//! encoder (`cross_layer..`, decoder rows by encoder columns).

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use smelt_corpus::Tokenizer;
use smelt_engine::model::{Bert, BertBatch, Gpt, T5Attention, T5Batch, T5};
use smelt_engine::CpuBackend;
use smelt_worker::model_file::{self, AnyModel, FamilyModel, SavedFamilyModel, SavedModel};

#[derive(Args, Debug)]
pub struct AttentionArgs {
    #[command(flatten)]
    pub threads: crate::threads::Threads,
    /// A model: a checkpoint, a model.safetensors (or a directory holding one), or a job id (its
    /// newest checkpoint under --store, else the coordinator's record).
    pub model: String,
    /// The text to look at, given as it is (the model's tokenizer must cover it).
    #[arg(long, required_unless_present = "text_file", conflicts_with = "text_file")]
    pub text: Option<String>,
    /// The text to look at, read from this file (its last line break left out).
    #[arg(long)]
    pub text_file: Option<PathBuf>,
    /// Output directory: layer<L>_head<H>.png for each layer and head, and attention.json.
    /// Heat maps of an earlier run there are deleted first. Each map's row (a query) is scaled
    /// by its own largest weight, so nearly even attention shows as patterned as a sharp one:
    /// the weights themselves are in attention.json.
    #[arg(long, default_value = "attention")]
    pub out: PathBuf,
    /// Pixels per token in the heat maps (0: chosen so a map is about 512 pixels wide).
    #[arg(long, default_value_t = 0)]
    pub cell: usize,
    /// T5 only: the decoder's text (after its start token); default: the --text itself.
    #[arg(long)]
    pub target: Option<String>,
    #[command(flatten)]
    pub store: crate::cmd_export::StoreArg,
}

/// The widest or tallest heat map written, in pixels (a PNG decoder's comfortable size).
const MAX_SIDE: usize = 16_384;

/// `cell` pixels per token for maps of up to `tokens` rows or columns, or why not.
fn check_cell(cell: usize, tokens: usize) -> Result<usize> {
    if cell.saturating_mul(tokens) > MAX_SIDE {
        bail!("--cell {cell}: a map of {tokens} tokens would be {} pixels wide; at most {MAX_SIDE}: choose --cell {} or less", cell.saturating_mul(tokens), (MAX_SIDE / tokens).max(1));
    }
    Ok(cell)
}

pub fn run(a: AttentionArgs) -> Result<()> {
    a.store.coordinator.install();
    let text = input_text(&a)?;
    let src = crate::cmd_export::read_in(&a.model, &a.store.store, "reading the model")?;
    let model_path = PathBuf::from(&src.file);
    match model_file::any_from_bytes(&src.bytes, &src.file)? {
        AnyModel::Gpt(saved) => run_gpt(&a, &text, &model_path, saved),
        AnyModel::Family(saved) => run_family(&a, &text, &model_path, saved),
    }
}

/// The text to look at: `--text` as given, or `--text-file`'s contents less its last line
/// break. `--text` naming a file is refused: `train` and `eval` read a file there, and drawing
/// the attention over the letters of its name is not what was meant.
fn input_text(a: &AttentionArgs) -> Result<String> {
    if let Some(path) = &a.text_file {
        let text = smelt_corpus::input::read_text_file(path).with_context(|| format!("reading --text-file {}", path.display()))?;
        let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
        return Ok(text.to_string());
    }
    let text = a.text.clone().unwrap_or_default();
    if !text.contains('\n') && Path::new(&text).is_file() {
        bail!("--text is the text itself, and {text:?} names a file: to look at that file's text, give --text-file {text:?}");
    }
    Ok(text)
}

/// Deletes the heat maps an earlier run left in `out` (its own file names only), so the
/// directory holds this model's maps alone.
fn remove_old_maps(out: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(out) else { return Ok(()) };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if is_heat_map_name(&name) {
            fs::remove_file(e.path()).with_context(|| format!("removing the earlier heat map {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// `layer3_head1.png`, `encoder_layer0_head0.png`, `decoder_layer..`, `cross_layer..`.
fn is_heat_map_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".png") else { return false };
    let stem = ["encoder_", "decoder_", "cross_"].iter().find_map(|p| stem.strip_prefix(p)).unwrap_or(stem);
    let Some((layer, head)) = stem.strip_prefix("layer").and_then(|r| r.split_once("_head")) else { return false };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(layer) && digits(head)
}

fn run_gpt(a: &AttentionArgs, text: &str, model_path: &Path, saved: SavedModel) -> Result<()> {
    if a.target.is_some() {
        bail!("--target is for T5 models (a decoder's input); this is a GPT");
    }
    let ids = saved.tokenizer.encode(text)?;
    if ids.is_empty() {
        bail!("--text must not be empty");
    }
    if ids.len() > saved.config.block_size {
        bail!("--text is {} tokens, more than the model's block_size {}", ids.len(), saved.config.block_size);
    }
    let (layers, heads, t) = (saved.config.n_layer, saved.config.n_head, ids.len());
    let mut model = Gpt::from_params(CpuBackend::new(), saved.config, &saved.params)?;
    model.forward(&ids, None, 1, t)?;
    let maps = model.attention_maps()?;

    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    remove_old_maps(&a.out)?;
    let cell = check_cell(if a.cell > 0 { a.cell } else { (512 / t).clamp(1, 32) }, t)?;
    for (l, map) in maps.iter().enumerate() {
        for h in 0..heads {
            let path = a.out.join(format!("layer{l}_head{h}.png"));
            write_heat_map(&path, &map[h * t * t..(h + 1) * t * t], t, t, cell)?;
        }
    }
    let tokens: Vec<String> = ids.iter().map(|&id| saved.tokenizer.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))).collect();
    let weights: Vec<Vec<Vec<&[f32]>>> =
        maps.iter().map(|m| (0..heads).map(|h| m[h * t * t..(h + 1) * t * t].chunks(t).collect()).collect()).collect();
    let doc = json!({
        "model": model_path.display().to_string(),
        "arch": "gpt",
        "text": text,
        "tokens": tokens,
        "token_ids": ids,
        "layers": layers,
        "heads": heads,
        "causal": true,
        "layout": "weights[layer][head][query][key]",
        "weights": weights,
    });
    let json_path = a.out.join("attention.json");
    fs::write(&json_path, serde_json::to_vec(&doc)?).with_context(|| format!("writing {}", json_path.display()))?;
    println!("wrote {} heat maps ({layers} layers x {heads} heads, {t} tokens) and {} to {}", layers * heads, json_path.display(), a.out.display());
    Ok(())
}

/// One attention of a model, per layer: (H, Tq, Tk) maps.
struct Attention {
    /// File name prefix (`layer`, `encoder_layer`, ...).
    prefix: &'static str,
    layers: Vec<Vec<f32>>,
    tq: usize,
    tk: usize,
}

impl Attention {
    /// Regroups the engine's (1, Tq, H, Tk) probabilities per head: (H, Tq, Tk).
    fn push_layer(&mut self, probs: Option<Vec<f32>>, heads: usize) -> Result<()> {
        let p = probs.context("this backend saved no attention probabilities")?;
        let (tq, tk) = (self.tq, self.tk);
        let mut out = vec![0.0f32; heads * tq * tk];
        for i in 0..tq {
            for h in 0..heads {
                out[(h * tq + i) * tk..(h * tq + i + 1) * tk].copy_from_slice(&p[(i * heads + h) * tk..(i * heads + h + 1) * tk]);
            }
        }
        self.layers.push(out);
        Ok(())
    }

    fn write_maps(&self, out: &Path, heads: usize, cell: usize) -> Result<()> {
        let n = self.tq * self.tk;
        for (l, map) in self.layers.iter().enumerate() {
            for h in 0..heads {
                write_heat_map(&out.join(format!("{}{l}_head{h}.png", self.prefix)), &map[h * n..(h + 1) * n], self.tq, self.tk, cell)?;
            }
        }
        Ok(())
    }

    /// weights[layer][head][query][key]
    fn json(&self, heads: usize) -> serde_json::Value {
        let n = self.tq * self.tk;
        let w: Vec<Vec<Vec<&[f32]>>> = self.layers.iter().map(|m| (0..heads).map(|h| m[h * n..(h + 1) * n].chunks(self.tk).collect()).collect()).collect();
        json!(w)
    }
}

/// Token strings for the JSON: the tokenizer's text, or the name of a reserved id.
fn token_names(ids: &[u32], tok: &Tokenizer, special: &dyn Fn(u32) -> Option<String>) -> Vec<String> {
    ids.iter().map(|&id| special(id).unwrap_or_else(|| tok.decode(&[id]).unwrap_or_else(|_| format!("<{id}>")))).collect()
}

fn run_family(a: &AttentionArgs, input: &str, model_path: &Path, saved: SavedFamilyModel) -> Result<()> {
    let SavedFamilyModel { model, tokenizer, params, .. } = saved;
    let text = tokenizer.encode(input)?;
    if text.is_empty() {
        bail!("--text must not be empty");
    }
    fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let (doc, maps, shape) = match model {
        FamilyModel::Bert { config, specials: s } => {
            if a.target.is_some() {
                bail!("--target is for T5 models (a decoder's input); this is a BERT");
            }
            let ids: Vec<u32> = std::iter::once(s.cls).chain(text).chain(std::iter::once(s.sep)).collect();
            let t = ids.len();
            if t > config.max_positions {
                bail!("--text is {} tokens with [CLS] and [SEP], more than the model's {} positions", t, config.max_positions);
            }
            let (layers, heads) = (config.n_layer, config.n_head);
            let mut m = Bert::from_params(CpuBackend::new(), config, &params)?;
            m.forward(&BertBatch::new(ids.clone(), 1, t))?;
            let mut att = Attention { prefix: "layer", layers: Vec::new(), tq: t, tk: t };
            for l in 0..layers {
                att.push_layer(m.attention_probs(l), heads)?;
            }
            let names = |id: u32| [(s.pad, "[PAD]"), (s.cls, "[CLS]"), (s.sep, "[SEP]"), (s.mask, "[MASK]")].iter().find(|p| p.0 == id).map(|p| p.1.to_string());
            let doc = json!({
                "model": model_path.display().to_string(),
                "arch": "bert",
                "text": input,
                "tokens": token_names(&ids, &tokenizer, &names),
                "token_ids": ids,
                "layers": layers,
                "heads": heads,
                "causal": false,
                "layout": "weights[layer][head][query][key]",
                "weights": att.json(heads),
            });
            (doc, vec![(att, heads)], format!("{layers} layers x {heads} heads, {t} tokens with [CLS] and [SEP]"))
        }
        FamilyModel::T5 { config, specials: s } => {
            let target = match &a.target {
                Some(t) => tokenizer.encode(t)?,
                None => text.clone(),
            };
            let dec: Vec<u32> = std::iter::once(s.pad).chain(target).collect();
            let (te, td) = (text.len(), dec.len());
            if te.max(td) > config.max_positions {
                bail!("--text or --target is longer than the model's {} positions ({te} encoder, {td} decoder tokens)", config.max_positions);
            }
            let (enc_layers, dec_layers, heads) = (config.n_layer, config.n_decoder_layer, config.n_head);
            let mut m = T5::from_params(CpuBackend::new(), config, &params)?;
            let x = T5Batch { batch: 1, enc_len: te, dec_len: td, enc_tokens: text.clone(), enc_lens: None, dec_tokens: dec.clone(), targets: None };
            m.forward(&x)?;
            let mut enc = Attention { prefix: "encoder_layer", layers: Vec::new(), tq: te, tk: te };
            let mut dself = Attention { prefix: "decoder_layer", layers: Vec::new(), tq: td, tk: td };
            let mut cross = Attention { prefix: "cross_layer", layers: Vec::new(), tq: td, tk: te };
            for l in 0..enc_layers {
                enc.push_layer(m.attention_probs(T5Attention::Encoder, l), heads)?;
            }
            for l in 0..dec_layers {
                dself.push_layer(m.attention_probs(T5Attention::DecoderSelf, l), heads)?;
                cross.push_layer(m.attention_probs(T5Attention::Cross, l), heads)?;
            }
            let sentinel_base = s.pad + 1;
            let names = |id: u32| {
                if id == s.pad {
                    Some("<pad>".to_string())
                } else {
                    (id >= sentinel_base).then(|| format!("<extra_id_{}>", s.pad + s.sentinels - id))
                }
            };
            let doc = json!({
                "model": model_path.display().to_string(),
                "arch": "t5",
                "text": input,
                "encoder_tokens": token_names(&text, &tokenizer, &names),
                "encoder_token_ids": text,
                "decoder_tokens": token_names(&dec, &tokenizer, &names),
                "decoder_token_ids": dec,
                "layers": enc_layers,
                "decoder_layers": dec_layers,
                "heads": heads,
                "layout": "encoder|decoder_self|cross[layer][head][query][key]; the decoder's self-attention is causal",
                "encoder": enc.json(heads),
                "decoder_self": dself.json(heads),
                "cross": cross.json(heads),
            });
            let shape = format!(
                "{enc_layers} encoder layers, {dec_layers} decoder layers of self- and cross-attention, x {heads} heads; {te} encoder, {td} decoder tokens"
            );
            (doc, vec![(enc, heads), (dself, heads), (cross, heads)], shape)
        }
    };
    let longest = maps.iter().map(|m| m.0.tq.max(m.0.tk)).max().unwrap_or(1);
    let cell = check_cell(if a.cell > 0 { a.cell } else { (512 / longest).clamp(1, 32) }, longest)?;
    // (only now: a run refused above leaves the earlier maps as they were)
    remove_old_maps(&a.out)?;
    let mut count = 0;
    for (att, heads) in &maps {
        att.write_maps(&a.out, *heads, cell)?;
        count += att.layers.len() * heads;
    }
    let json_path = a.out.join("attention.json");
    fs::write(&json_path, serde_json::to_vec(&doc)?).with_context(|| format!("writing {}", json_path.display()))?;
    println!("wrote {count} heat maps ({shape}) and {} to {}", json_path.display(), a.out.display());
    Ok(())
}

/// A `rows x cols` map of weights in [0, 1] as an RGB PNG, `cell` pixels per entry. Each row (one
/// query's distribution over keys) is scaled by its own maximum: under a causal mask the first
/// query puts all its weight on itself, so one scale for the whole map would leave every other
/// row near black. attention.json keeps the unscaled weights.
fn write_heat_map(path: &Path, weights: &[f32], rows: usize, cols: usize, cell: usize) -> Result<()> {
    let row_max: Vec<f32> =
        weights.chunks(cols).map(|r| r.iter().cloned().fold(f32::MIN_POSITIVE, f32::max)).collect();
    let (width, height) = (cols * cell, rows * cell);
    let mut pixels = vec![0u8; width * height * 3];
    for (y, row) in pixels.chunks_mut(width * 3).enumerate() {
        let q = y / cell;
        for x in 0..width {
            let w = weights[q * cols + x / cell] / row_max[q];
            row[x * 3..x * 3 + 3].copy_from_slice(&viridis(w));
        }
    }
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), width as u32, height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().with_context(|| format!("writing {}", path.display()))?;
    writer.write_image_data(&pixels).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The viridis colour map (dark purple at 0, yellow at 1), linear between five of its stops.
fn viridis(x: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] =
        [[68.0, 1.0, 84.0], [59.0, 82.0, 139.0], [33.0, 145.0, 140.0], [94.0, 201.0, 98.0], [253.0, 231.0, 37.0]];
    let x = x.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f32;
    let mut rgb = [0u8; 3];
    for c in 0..3 {
        rgb[c] = (STOPS[i][c] + (STOPS[i + 1][c] - STOPS[i][c]) * f).round() as u8;
    }
    rgb
}
