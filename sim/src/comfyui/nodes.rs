//! What each node class computes. Pictures are real but small; models,
//! CLIP and VAE are names carried along so later nodes can be checked.

use std::{collections::HashMap, sync::Arc};

use serde_json::{json, Map, Value};

use super::files::Files;
use crate::media::{self, clamp_size, Image};

/// A value flowing along a link. Models, CLIP and VAE carry nothing: the
/// simulator only needs to know a link of the right type exists.
#[derive(Clone, Debug)]
pub(crate) enum Out {
    Image(Arc<Image>),
    /// A constant mask.
    Mask(f32),
    Latent(Arc<Latent>),
    Model,
    Clip,
    Vae,
    ClipVision,
    ClipVisionOutput,
    Conditioning(Arc<String>),
    /// RandomNoise: the seed the sampler draws its noise from.
    Noise(u64),
    /// KSamplerSelect: which algorithm does not change the simulated picture.
    Sampler,
    /// BasicScheduler: the number of steps the sigmas schedule.
    Sigmas(u64),
    /// BasicGuider: the conditioning's prompt text.
    Guider(Arc<String>),
}

/// A latent: enough to draw its decoded picture later.
#[derive(Clone, Debug)]
pub(crate) struct Latent {
    pub width: u32,
    pub height: u32,
    pub batch: usize,
    /// Video frames per batch item (1 for stills).
    pub frames: usize,
    pub text: String,
    pub seed: u64,
    pub start: Option<Arc<Image>>,
}

/// Largest number of video frames the simulator renders.
pub(crate) const MAX_FRAMES: usize = 16;

/// A node's results: its outputs and, for output nodes, its UI entry.
pub(crate) struct Produced {
    pub outputs: Vec<Out>,
    pub ui: Option<Value>,
}

/// A run-time failure, reported as `execution_error`.
#[derive(Debug)]
pub(crate) struct NodeFailure {
    pub exception_type: String,
    pub message: String,
}

impl NodeFailure {
    pub fn runtime(message: impl Into<String>) -> NodeFailure {
        NodeFailure {
            exception_type: "RuntimeError".into(),
            message: message.into(),
        }
    }
}

/// A node's inputs: literals from the graph, links already evaluated.
pub(crate) struct Args<'a> {
    pub literals: &'a Map<String, Value>,
    pub links: HashMap<String, Out>,
}

impl Args<'_> {
    fn int(&self, name: &str, default: i64) -> i64 {
        match self.literals.get(name) {
            Some(Value::Number(n)) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(default)
    }

    fn seed(&self, name: &str) -> u64 {
        match self.literals.get(name) {
            Some(Value::Number(n)) => n.as_u64().unwrap_or_default(),
            Some(Value::String(s)) => s.trim().parse().unwrap_or_default(),
            _ => 0,
        }
    }

    fn float(&self, name: &str, default: f64) -> f64 {
        match self.literals.get(name) {
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            _ => None,
        }
        .unwrap_or(default)
    }

    fn text(&self, name: &str) -> String {
        match self.literals.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }

    fn image(&self, name: &str) -> Result<Arc<Image>, NodeFailure> {
        match self.links.get(name) {
            Some(Out::Image(image)) => Ok(image.clone()),
            _ => Err(missing(name)),
        }
    }

    fn latent(&self, name: &str) -> Result<Arc<Latent>, NodeFailure> {
        match self.links.get(name) {
            Some(Out::Latent(latent)) => Ok(latent.clone()),
            _ => Err(missing(name)),
        }
    }

    fn conditioning(&self, name: &str) -> String {
        match self.links.get(name) {
            Some(Out::Conditioning(text)) => text.to_string(),
            _ => String::new(),
        }
    }
}

fn missing(name: &str) -> NodeFailure {
    NodeFailure {
        exception_type: "TypeError".into(),
        message: format!("missing required input '{name}'"),
    }
}

/// What save nodes need beyond their inputs.
pub(crate) struct SaveContext<'a> {
    pub files: &'a Files,
    /// The prompt as JSON, embedded in PNG text chunks like ComfyUI does.
    pub prompt_json: &'a str,
    /// Random prefix of PreviewImage's temp files.
    pub temp_prefix: &'a str,
}

/// Runs node `class` on `args`.
pub(crate) fn evaluate(
    class: &str,
    args: &Args<'_>,
    save: &SaveContext<'_>,
) -> Result<Produced, NodeFailure> {
    let one = |out: Out| {
        Ok(Produced {
            outputs: vec![out],
            ui: None,
        })
    };
    match class {
        "EmptyImage" => one(empty_image(args)),
        "ImageInvert" => one(Out::Image(Arc::new(media::invert(&*args.image("image")?)))),
        "LoadImage" => load_image(args, save.files),
        "ImageScale" => one(Out::Image(Arc::new(scale(args)?))),
        "ImageBlur" => {
            let passes = (args.int("blur_radius", 1) as u32).div_ceil(10);
            one(Out::Image(Arc::new(media::blur(
                &*args.image("image")?,
                passes,
            ))))
        }
        "ImageBatch" => one(Out::Image(Arc::new(batch(args)?))),
        "JoinImageWithAlpha" => one(Out::Image(Arc::new(join_alpha(args)?))),
        "SolidMask" => one(Out::Mask(args.float("value", 1.0) as f32)),
        "CheckpointLoaderSimple" => Ok(Produced {
            outputs: vec![Out::Model, Out::Clip, Out::Vae],
            ui: None,
        }),
        "UNETLoader" => one(Out::Model),
        "DualCLIPLoader" | "CLIPLoader" => one(Out::Clip),
        "CLIPVisionLoader" => one(Out::ClipVision),
        "VAELoader" => one(Out::Vae),
        "CLIPVisionEncode" => one(Out::ClipVisionOutput),
        "CLIPTextEncode" => one(Out::Conditioning(Arc::new(args.text("text")))),
        "FluxGuidance" => one(Out::Conditioning(Arc::new(
            args.conditioning("conditioning"),
        ))),
        "ModelSamplingSD3" | "ModelSamplingFlux" => one(args
            .links
            .get("model")
            .cloned()
            .ok_or_else(|| missing("model"))?),
        "EmptyLatentImage" | "EmptySD3LatentImage" => one(empty_latent(args)),
        "KSampler" => one(Out::Latent(Arc::new(sample(args, "seed")?))),
        "KSamplerAdvanced" => one(Out::Latent(Arc::new(sample(args, "noise_seed")?))),
        "RandomNoise" => one(Out::Noise(args.seed("noise_seed"))),
        "KSamplerSelect" => one(Out::Sampler),
        "BasicScheduler" => one(Out::Sigmas(scheduled_steps(args))),
        "BasicGuider" => one(Out::Guider(Arc::new(args.conditioning("conditioning")))),
        "SamplerCustomAdvanced" => {
            let latent = Out::Latent(Arc::new(sample_custom(args)?));
            Ok(Produced {
                outputs: vec![latent.clone(), latent],
                ui: None,
            })
        }
        "WanImageToVideo" => wan_image_to_video(args),
        "VAEDecode" => one(Out::Image(Arc::new(decode(&*args.latent("samples")?)))),
        "SaveImage" => save_images(args, save, "output", "filename_prefix"),
        "PreviewImage" => save_images(args, save, "temp", ""),
        "SaveImageWebsocket" => Ok(Produced {
            outputs: Vec::new(),
            ui: None,
        }),
        "SaveAnimatedPNG" | "SaveAnimatedWEBP" => save_animation(class, args, save),
        other => Err(NodeFailure::runtime(format!(
            "simulator cannot run {other}"
        ))),
    }
}

fn empty_image(args: &Args<'_>) -> Out {
    let (w, h) = clamp_size(
        args.int("width", 512) as u32,
        args.int("height", 512) as u32,
    );
    let color = args.int("color", 0) as u32;
    let rgb = [(color >> 16) as u8, (color >> 8) as u8, color as u8];
    let count = args.int("batch_size", 1).clamp(1, 64) as usize;
    Out::Image(Arc::new(Image::solid(w, h, count, rgb)))
}

fn load_image(args: &Args<'_>, files: &Files) -> Result<Produced, NodeFailure> {
    let name = args.text("image");
    let unreadable = |detail: String| NodeFailure {
        exception_type: "PIL.UnidentifiedImageError".into(),
        message: format!("cannot identify image file '{name}': {detail}"),
    };
    let path = files
        .input_path(&name)
        .ok_or_else(|| unreadable("bad path".into()))?;
    let bytes = std::fs::read(&path).map_err(|e| unreadable(e.to_string()))?;
    let mut image = media::decode_png(&bytes).map_err(|e| unreadable(e.to_string()))?;
    let alpha = image.channels == 4;
    if alpha {
        image.frames = image.frames.iter().map(|f| strip_alpha(f)).collect();
        image.channels = 3;
    }
    let mask = Out::Mask(0.0);
    Ok(Produced {
        outputs: vec![Out::Image(Arc::new(image)), mask],
        ui: None,
    })
}

fn strip_alpha(frame: &[u8]) -> Vec<u8> {
    frame.chunks(4).flat_map(|p| [p[0], p[1], p[2]]).collect()
}

fn scale(args: &Args<'_>) -> Result<Image, NodeFailure> {
    let image = args.image("image")?;
    let (mut w, mut h) = (
        args.int("width", 512) as u32,
        args.int("height", 512) as u32,
    );
    if w == 0 && h == 0 {
        return Ok((*image).clone());
    }
    if w == 0 {
        w = (u64::from(image.width) * u64::from(h) / u64::from(image.height.max(1))) as u32;
    } else if h == 0 {
        h = (u64::from(image.height) * u64::from(w) / u64::from(image.width.max(1))) as u32;
    }
    let (w, h) = clamp_size(w, h);
    let smooth = args.text("upscale_method") != "nearest-exact";
    Ok(media::scale(&image, w, h, smooth))
}

fn batch(args: &Args<'_>) -> Result<Image, NodeFailure> {
    let (first, second) = (args.image("image1")?, args.image("image2")?);
    if first.channels != second.channels {
        return Err(NodeFailure::runtime(format!(
            "Sizes of tensors must match except in dimension 0. Expected size {} but got size \
             {} for tensor number 1 in the list.\n",
            first.channels, second.channels
        )));
    }
    let second = if (first.width, first.height) == (second.width, second.height) {
        second
    } else {
        Arc::new(media::scale(&second, first.width, first.height, true))
    };
    let mut joined = (*first).clone();
    joined.frames.extend(second.frames.iter().cloned());
    Ok(joined)
}

fn join_alpha(args: &Args<'_>) -> Result<Image, NodeFailure> {
    let image = args.image("image")?;
    let alpha = match args.links.get("alpha") {
        Some(Out::Mask(value)) => ((1.0 - value.clamp(0.0, 1.0)) * 255.0).round() as u8,
        _ => 255,
    };
    let channels = usize::from(image.channels);
    let frames = image
        .frames
        .iter()
        .map(|f| {
            f.chunks(channels)
                .flat_map(|p| [p[0], p[1], p[2], alpha])
                .collect()
        })
        .collect();
    Ok(Image {
        channels: 4,
        frames,
        ..(*image).clone()
    })
}

fn empty_latent(args: &Args<'_>) -> Out {
    let (width, height) = clamp_size(
        args.int("width", 512) as u32,
        args.int("height", 512) as u32,
    );
    Out::Latent(Arc::new(Latent {
        width,
        height,
        batch: args.int("batch_size", 1).clamp(1, 16) as usize,
        frames: 1,
        text: String::new(),
        seed: 0,
        start: None,
    }))
}

fn sample(args: &Args<'_>, seed: &str) -> Result<Latent, NodeFailure> {
    let latent = args.latent("latent_image")?;
    let positive = args.conditioning("positive");
    let text = if positive.is_empty() {
        latent.text.clone()
    } else {
        positive
    };
    Ok(Latent {
        text,
        seed: args.seed(seed),
        ..(*latent).clone()
    })
}

/// The steps BasicScheduler's sigmas cover: `steps`, or none when
/// `denoise` is 0 (ComfyUI then returns an empty schedule).
fn scheduled_steps(args: &Args<'_>) -> u64 {
    if args.float("denoise", 1.0) <= 0.0 {
        return 0;
    }
    args.int("steps", 20).clamp(1, 10_000) as u64
}

/// SamplerCustomAdvanced: the seed comes from the noise, the prompt text
/// from the guider's conditioning.
fn sample_custom(args: &Args<'_>) -> Result<Latent, NodeFailure> {
    let latent = args.latent("latent_image")?;
    let seed = match args.links.get("noise") {
        Some(Out::Noise(seed)) => *seed,
        _ => return Err(missing("noise")),
    };
    let text = match args.links.get("guider") {
        Some(Out::Guider(text)) if !text.is_empty() => text.to_string(),
        Some(Out::Guider(_)) => latent.text.clone(),
        _ => return Err(missing("guider")),
    };
    if !matches!(args.links.get("sampler"), Some(Out::Sampler)) {
        return Err(missing("sampler"));
    }
    if !matches!(args.links.get("sigmas"), Some(Out::Sigmas(_))) {
        return Err(missing("sigmas"));
    }
    Ok(Latent {
        text,
        seed,
        ..(*latent).clone()
    })
}

fn wan_image_to_video(args: &Args<'_>) -> Result<Produced, NodeFailure> {
    let (width, height) = clamp_size(
        args.int("width", 832) as u32,
        args.int("height", 480) as u32,
    );
    let start = match args.links.get("start_image") {
        Some(Out::Image(image)) => Some(image.clone()),
        _ => None,
    };
    let latent = Latent {
        width,
        height,
        batch: args.int("batch_size", 1).clamp(1, 4) as usize,
        frames: (args.int("length", 81).max(1) as usize).min(MAX_FRAMES),
        text: args.conditioning("positive"),
        seed: 0,
        start,
    };
    let positive = Out::Conditioning(Arc::new(args.conditioning("positive")));
    let negative = Out::Conditioning(Arc::new(args.conditioning("negative")));
    Ok(Produced {
        outputs: vec![positive, negative, Out::Latent(Arc::new(latent))],
        ui: None,
    })
}

/// Draws the decoded picture: from the start image for video, else from
/// the prompt text and seed.
fn decode(latent: &Latent) -> Image {
    let still = match &latent.start {
        Some(start) => media::scale(start, latent.width, latent.height, true),
        None => Image {
            width: latent.width,
            height: latent.height,
            channels: 3,
            frames: vec![media::pattern(
                latent.width,
                latent.height,
                &latent.text,
                latent.seed,
            )],
        },
    };
    let mut out = Image {
        frames: Vec::new(),
        ..still.clone()
    };
    for item in 0..latent.batch {
        let mut variant = still.clone();
        if item > 0 {
            let seed = latent.seed.wrapping_add(item as u64);
            variant.frames = vec![media::pattern(
                latent.width,
                latent.height,
                &latent.text,
                seed,
            )];
        }
        let frames = if latent.frames > 1 {
            media::tint_frames(&variant, latent.frames)
        } else {
            variant
        };
        out.frames.extend(frames.frames);
    }
    out
}

fn write_failure(error: impl std::fmt::Display) -> NodeFailure {
    NodeFailure {
        exception_type: "OSError".into(),
        message: error.to_string(),
    }
}

fn save_images(
    args: &Args<'_>,
    save: &SaveContext<'_>,
    kind: &str,
    prefix_input: &str,
) -> Result<Produced, NodeFailure> {
    let image = args.image("images")?;
    let prefix = if prefix_input.is_empty() {
        format!("ComfyUI_temp_{}", save.temp_prefix)
    } else {
        args.text(prefix_input)
    };
    let mut target = save
        .files
        .next_save_path(kind, &prefix, "png")
        .ok_or_else(|| write_failure(format!("invalid filename prefix {prefix}")))?;
    let text = [("prompt", save.prompt_json.to_owned())];
    let mut results = Vec::new();
    for index in 0..image.frames.len() {
        let bytes = media::encode_png(&image, index, &text).map_err(write_failure)?;
        let (name, path) = target.claim();
        std::fs::write(&path, bytes).map_err(write_failure)?;
        results.push(json!({"filename": name, "subfolder": target.subfolder, "type": kind}));
    }
    Ok(Produced {
        outputs: Vec::new(),
        ui: Some(json!({"images": results})),
    })
}

fn save_animation(
    class: &str,
    args: &Args<'_>,
    save: &SaveContext<'_>,
) -> Result<Produced, NodeFailure> {
    let image = args.image("images")?;
    let fps = args.float("fps", 6.0);
    let webp = class == "SaveAnimatedWEBP";
    let prefix = args.text("filename_prefix");
    let ext = if webp { "webp" } else { "png" };
    let mut target = save
        .files
        .next_save_path("output", &prefix, ext)
        .ok_or_else(|| write_failure(format!("invalid filename prefix {prefix}")))?;
    let bytes = if webp {
        media::encode_animated_webp(&image, fps)
    } else {
        media::encode_apng(&image, fps, &[("prompt", save.prompt_json.to_owned())])
    }
    .map_err(write_failure)?;
    let (name, path) = target.claim();
    std::fs::write(&path, bytes).map_err(write_failure)?;
    let entry = json!({"filename": name, "subfolder": target.subfolder, "type": "output"});
    Ok(Produced {
        outputs: Vec::new(),
        ui: Some(json!({"images": [entry], "animated": [true]})),
    })
}
