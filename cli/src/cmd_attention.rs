//! `smelt attention`: a trained model's attention weights for one text, per layer and head, as
//! PNG heat maps (row = query token, column = key token, brighter = more weight) and as JSON.

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use smelt_engine::model::Gpt;
use smelt_engine::CpuBackend;
use smelt_worker::model_file;

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// A model.safetensors written by smelt (a job's model, or a checkpoint directory's).
    pub model: PathBuf,
    /// The text to look at (the model's tokenizer must cover it).
    #[arg(long)]
    pub text: String,
    /// Output directory: layer<L>_head<H>.png for each layer and head, and attention.json.
    #[arg(long, default_value = "attention")]
    pub out: PathBuf,
    /// Pixels per token in the heat maps (0: chosen so a map is about 512 pixels wide).
    #[arg(long, default_value_t = 0)]
    pub cell: usize,
}

pub fn run(a: AttentionArgs) -> Result<()> {
    let model_path = if a.model.is_dir() { a.model.join("model.safetensors") } else { a.model.clone() };
    let saved = model_file::load(&model_path)?;
    let ids = saved.tokenizer.encode(&a.text)?;
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
    let cell = if a.cell > 0 { a.cell } else { (512 / t).clamp(1, 32) };
    for (l, map) in maps.iter().enumerate() {
        for h in 0..heads {
            let path = a.out.join(format!("layer{l}_head{h}.png"));
            write_heat_map(&path, &map[h * t * t..(h + 1) * t * t], t, cell)?;
        }
    }
    let tokens: Vec<String> = ids.iter().map(|&id| saved.tokenizer.decode(&[id]).unwrap_or_else(|_| format!("<{id}>"))).collect();
    let weights: Vec<Vec<Vec<&[f32]>>> =
        maps.iter().map(|m| (0..heads).map(|h| m[h * t * t..(h + 1) * t * t].chunks(t).collect()).collect()).collect();
    let doc = json!({
        "model": model_path.display().to_string(),
        "text": a.text,
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

/// A `t x t` map of weights in [0, 1] as an RGB PNG, `cell` pixels per entry, each row scaled
/// by the map's maximum so that weak heads stay readable.
fn write_heat_map(path: &Path, weights: &[f32], t: usize, cell: usize) -> Result<()> {
    let max = weights.iter().cloned().fold(f32::MIN_POSITIVE, f32::max);
    let side = t * cell;
    let mut pixels = vec![0u8; side * side * 3];
    for (y, row) in pixels.chunks_mut(side * 3).enumerate() {
        for x in 0..side {
            let w = weights[(y / cell) * t + x / cell] / max;
            row[x * 3..x * 3 + 3].copy_from_slice(&viridis(w));
        }
    }
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), side as u32, side as u32);
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
