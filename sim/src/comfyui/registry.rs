//! The node classes the simulator knows, as `/object_info` describes them.
//!
//! Input specs are kept in ComfyUI's own JSON form (`["INT", {min, max}]`,
//! `[[choices], {}]`, `["IMAGE"]`), because validation reads them the same way
//! ComfyUI reads `INPUT_TYPES`. Classes recorded in `object_info_subset.json`
//! reproduce the recording; the model-side classes follow ComfyUI's
//! definitions for the Flux text-to-image and Wan 2.1 image-to-video examples.

use serde_json::{json, Map, Value};

/// Where a combo's choices come from.
#[derive(Clone, Debug)]
pub(crate) enum Spec {
    /// A literal `[type, options]` spec.
    Fixed(Value),
    /// Model files of one folder (`/models/{folder}`).
    Models(&'static str),
    /// Files uploaded to the input folder (LoadImage).
    InputFiles,
}

/// One node class.
#[derive(Clone, Debug)]
pub(crate) struct ClassDef {
    pub name: &'static str,
    pub display_name: Option<&'static str>,
    pub category: &'static str,
    pub python_module: &'static str,
    pub description: &'static str,
    pub output_node: bool,
    /// `(type, name)` per output slot.
    pub outputs: Vec<(&'static str, &'static str)>,
    pub required: Vec<(&'static str, Spec)>,
    pub optional: Vec<(&'static str, Spec)>,
    /// Whether the `hidden` prompt/extra_pnginfo inputs are declared.
    pub hidden_prompt: bool,
    /// Extra keys newer (V3) nodes carry in object_info.
    pub v3: bool,
}

/// What the dynamic combos resolve against.
pub(crate) struct ComboSource<'a> {
    pub models: &'a dyn Fn(&str) -> Vec<String>,
    pub input_files: &'a [String],
}

impl ClassDef {
    /// The spec of input `name`, resolved, and whether it is required.
    pub fn input(&self, name: &str, src: &ComboSource<'_>) -> Option<(Value, bool)> {
        let required = self.required.iter().map(|i| (i, true));
        let optional = self.optional.iter().map(|i| (i, false));
        required
            .chain(optional)
            .find(|((n, _), _)| *n == name)
            .map(|((_, spec), req)| (resolve(spec, src), req))
    }

    /// Output type of slot `slot`.
    pub fn output_type(&self, slot: usize) -> Option<&'static str> {
        self.outputs.get(slot).map(|(t, _)| *t)
    }

    /// This class's `/object_info` entry.
    pub fn info(&self, src: &ComboSource<'_>) -> Value {
        let section = |inputs: &[(&'static str, Spec)]| {
            let map: Map<String, Value> = inputs
                .iter()
                .map(|(n, s)| ((*n).to_owned(), resolve(s, src)))
                .collect();
            Value::Object(map)
        };
        let names = |inputs: &[(&'static str, Spec)]| -> Vec<&str> {
            inputs.iter().map(|(n, _)| *n).collect()
        };
        let mut input = json!({ "required": section(&self.required) });
        let mut order = json!({ "required": names(&self.required) });
        if !self.optional.is_empty() {
            input["optional"] = section(&self.optional);
            order["optional"] = json!(names(&self.optional));
        }
        if self.hidden_prompt {
            input["hidden"] = json!({"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"});
            order["hidden"] = json!(["prompt", "extra_pnginfo"]);
        }
        let mut info = json!({
            "input": input,
            "input_order": order,
            "output": self.outputs.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            "output_is_list": self.outputs.iter().map(|_| false).collect::<Vec<_>>(),
            "output_name": self.outputs.iter().map(|(_, n)| *n).collect::<Vec<_>>(),
            "name": self.name,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        });
        if self.v3 {
            info["output_tooltips"] =
                json!(self.outputs.iter().map(|_| Value::Null).collect::<Vec<_>>());
            info["deprecated"] = json!(false);
            info["experimental"] = json!(false);
            info["api_node"] = json!(false);
        }
        info
    }
}

fn resolve(spec: &Spec, src: &ComboSource<'_>) -> Value {
    match spec {
        Spec::Fixed(value) => value.clone(),
        Spec::Models(folder) => json!([(src.models)(folder), {}]),
        Spec::InputFiles => json!([src.input_files, {"image_upload": true}]),
    }
}

/// Folders `/models/{folder}` answers for, with the aliases ComfyUI keeps.
pub(crate) const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "clip",
    "unet",
    "configs",
];

/// Maps a legacy folder alias to the folder it shares files with.
pub(crate) fn canonical_folder(folder: &str) -> &str {
    match folder {
        "clip" => "text_encoders",
        "unet" => "diffusion_models",
        other => other,
    }
}

const SAMPLERS: &[&str] = &[
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "gradient_estimation",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
];

const SCHEDULERS: &[&str] = &[
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
];

fn fixed(value: Value) -> Spec {
    Spec::Fixed(value)
}

fn int(default: i64, min: i64, max: u64, step: Option<i64>) -> Spec {
    let mut options = json!({"default": default, "min": min, "max": max});
    if let Some(step) = step {
        options["step"] = json!(step);
    }
    fixed(json!(["INT", options]))
}

fn float(default: f64, min: f64, max: f64, step: f64) -> Spec {
    fixed(json!(["FLOAT", {"default": default, "min": min, "max": max, "step": step}]))
}

fn link(kind: &str) -> Spec {
    fixed(json!([kind]))
}

fn combo(choices: &[&str]) -> Spec {
    fixed(json!([choices]))
}

fn prefix() -> Spec {
    let tooltip = "The prefix for the file to save. This may include formatting information \
                   such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values \
                   from nodes.";
    fixed(json!(["STRING", {"default": "ComfyUI", "tooltip": tooltip}]))
}

fn base(name: &'static str, category: &'static str) -> ClassDef {
    ClassDef {
        name,
        display_name: Some(name),
        category,
        python_module: "nodes",
        description: "",
        output_node: false,
        outputs: Vec::new(),
        required: Vec::new(),
        optional: Vec::new(),
        hidden_prompt: false,
        v3: false,
    }
}

/// Every class the simulator executes.
pub(crate) fn classes() -> Vec<ClassDef> {
    let mut all = image_classes();
    all.extend(model_classes());
    all.extend(sampling_classes());
    all.extend(custom_sampling_classes());
    all.extend(saving_classes());
    all
}

fn image_classes() -> Vec<ClassDef> {
    let size = || int(512, 1, 16384, Some(1));
    vec![
        ClassDef {
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![
                ("width", size()),
                ("height", size()),
                ("batch_size", int(1, 1, 4096, None)),
                (
                    "color",
                    fixed(json!(["INT", {"default": 0, "min": 0, "max": 16777215,
                    "step": 1, "display": "color"}])),
                ),
            ],
            ..base("EmptyImage", "image")
        },
        ClassDef {
            display_name: Some("Invert Image"),
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![("image", link("IMAGE"))],
            ..base("ImageInvert", "image")
        },
        ClassDef {
            display_name: Some("Load Image"),
            outputs: vec![("IMAGE", "IMAGE"), ("MASK", "MASK")],
            required: vec![("image", Spec::InputFiles)],
            ..base("LoadImage", "image")
        },
        ClassDef {
            display_name: Some("Upscale Image"),
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![
                ("image", link("IMAGE")),
                (
                    "upscale_method",
                    combo(&["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]),
                ),
                ("width", int(512, 0, 16384, Some(1))),
                ("height", int(512, 0, 16384, Some(1))),
                ("crop", combo(&["disabled", "center"])),
            ],
            ..base("ImageScale", "image/upscaling")
        },
        ClassDef {
            display_name: None,
            python_module: "comfy_extras.nodes_post_processing",
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![
                ("image", fixed(json!(["IMAGE", {}]))),
                ("blur_radius", int(1, 1, 31, Some(1))),
                ("sigma", float(1.0, 0.1, 10.0, 0.1)),
            ],
            v3: true,
            ..base("ImageBlur", "image/postprocessing")
        },
        ClassDef {
            display_name: Some("Batch Images"),
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![("image1", link("IMAGE")), ("image2", link("IMAGE"))],
            ..base("ImageBatch", "image")
        },
        ClassDef {
            display_name: Some("Join Image with Alpha"),
            python_module: "comfy_extras.nodes_compositing",
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![
                ("image", fixed(json!(["IMAGE", {}]))),
                ("alpha", fixed(json!(["MASK", {}]))),
            ],
            v3: true,
            ..base("JoinImageWithAlpha", "mask/compositing")
        },
        ClassDef {
            python_module: "comfy_extras.nodes_mask",
            outputs: vec![("MASK", "MASK")],
            required: vec![
                ("value", float(1.0, 0.0, 1.0, 0.01)),
                ("width", int(512, 1, 16384, Some(1))),
                ("height", int(512, 1, 16384, Some(1))),
            ],
            ..base("SolidMask", "mask")
        },
    ]
}

fn loader(name: &'static str, input: &'static str, folder: &'static str) -> ClassDef {
    ClassDef {
        display_name: Some(name),
        required: vec![(input, Spec::Models(folder))],
        ..base(name, "loaders")
    }
}

fn model_classes() -> Vec<ClassDef> {
    let device = || {
        (
            "device",
            fixed(json!([["default", "cpu"], {"advanced": true}])),
        )
    };
    vec![
        ClassDef {
            display_name: Some("Load Checkpoint"),
            outputs: vec![("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
            ..loader("CheckpointLoaderSimple", "ckpt_name", "checkpoints")
        },
        ClassDef {
            display_name: Some("Load Diffusion Model"),
            outputs: vec![("MODEL", "MODEL")],
            required: vec![
                ("unet_name", Spec::Models("diffusion_models")),
                (
                    "weight_dtype",
                    combo(&["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]),
                ),
            ],
            category: "advanced/loaders",
            ..loader("UNETLoader", "unet_name", "diffusion_models")
        },
        ClassDef {
            outputs: vec![("CLIP", "CLIP")],
            required: vec![
                ("clip_name1", Spec::Models("text_encoders")),
                ("clip_name2", Spec::Models("text_encoders")),
                (
                    "type",
                    combo(&["sdxl", "sd3", "flux", "hunyuan_video", "hidream"]),
                ),
            ],
            optional: vec![device()],
            category: "advanced/loaders",
            ..loader("DualCLIPLoader", "clip_name1", "text_encoders")
        },
        ClassDef {
            display_name: Some("Load CLIP"),
            outputs: vec![("CLIP", "CLIP")],
            required: vec![
                ("clip_name", Spec::Models("text_encoders")),
                (
                    "type",
                    combo(&[
                        "stable_diffusion",
                        "stable_cascade",
                        "sd3",
                        "stable_audio",
                        "mochi",
                        "ltxv",
                        "pixart",
                        "cosmos",
                        "lumina2",
                        "wan",
                        "hidream",
                        "chroma",
                        "ace",
                        "omnigen2",
                        "qwen_image",
                        "hunyuan_image",
                    ]),
                ),
            ],
            optional: vec![device()],
            category: "advanced/loaders",
            ..loader("CLIPLoader", "clip_name", "text_encoders")
        },
        ClassDef {
            display_name: Some("Load CLIP Vision"),
            outputs: vec![("CLIP_VISION", "CLIP_VISION")],
            ..loader("CLIPVisionLoader", "clip_name", "clip_vision")
        },
        ClassDef {
            display_name: Some("Load VAE"),
            outputs: vec![("VAE", "VAE")],
            ..loader("VAELoader", "vae_name", "vae")
        },
        ClassDef {
            display_name: Some("CLIP Vision Encode"),
            outputs: vec![("CLIP_VISION_OUTPUT", "CLIP_VISION_OUTPUT")],
            required: vec![
                ("clip_vision", link("CLIP_VISION")),
                ("image", link("IMAGE")),
                ("crop", combo(&["center", "none"])),
            ],
            ..base("CLIPVisionEncode", "conditioning")
        },
        ClassDef {
            display_name: Some("CLIP Text Encode (Prompt)"),
            outputs: vec![("CONDITIONING", "CONDITIONING")],
            required: vec![
                (
                    "text",
                    fixed(json!(["STRING", {"multiline": true, "dynamicPrompts": true,
                    "tooltip": "The text to be encoded."}])),
                ),
                (
                    "clip",
                    fixed(json!(["CLIP", {"tooltip":
                    "The CLIP model used for encoding the text."}])),
                ),
            ],
            ..base("CLIPTextEncode", "conditioning")
        },
        ClassDef {
            python_module: "comfy_extras.nodes_flux",
            outputs: vec![("CONDITIONING", "CONDITIONING")],
            required: vec![
                ("conditioning", link("CONDITIONING")),
                ("guidance", float(3.5, 0.0, 100.0, 0.1)),
            ],
            ..base("FluxGuidance", "advanced/conditioning/flux")
        },
        ClassDef {
            python_module: "comfy_extras.nodes_model_advanced",
            outputs: vec![("MODEL", "MODEL")],
            required: vec![
                ("model", link("MODEL")),
                ("shift", float(3.0, 0.0, 100.0, 0.01)),
            ],
            ..base("ModelSamplingSD3", "advanced/model")
        },
        ClassDef {
            python_module: "comfy_extras.nodes_model_advanced",
            outputs: vec![("MODEL", "MODEL")],
            required: vec![
                ("model", link("MODEL")),
                ("max_shift", float(1.15, 0.0, 100.0, 0.01)),
                ("base_shift", float(0.5, 0.0, 100.0, 0.01)),
                ("width", int(1024, 16, 16384, Some(8))),
                ("height", int(1024, 16, 16384, Some(8))),
            ],
            ..base("ModelSamplingFlux", "advanced/model")
        },
    ]
}

fn sampling_classes() -> Vec<ClassDef> {
    let seed = || int(0, 0, u64::MAX, None);
    let steps = || int(20, 1, 10000, None);
    let cfg = || {
        fixed(
            json!(["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
        "round": 0.01}]),
        )
    };
    let latent_size = |default: i64, step: i64| int(default, 16, 16384, Some(step));
    vec![
        ClassDef {
            display_name: Some("Empty Latent Image"),
            outputs: vec![("LATENT", "LATENT")],
            required: vec![
                ("width", latent_size(512, 8)),
                ("height", latent_size(512, 8)),
                ("batch_size", int(1, 1, 4096, None)),
            ],
            ..base("EmptyLatentImage", "latent")
        },
        ClassDef {
            python_module: "comfy_extras.nodes_sd3",
            outputs: vec![("LATENT", "LATENT")],
            required: vec![
                ("width", latent_size(1024, 16)),
                ("height", latent_size(1024, 16)),
                ("batch_size", int(1, 1, 4096, None)),
            ],
            ..base("EmptySD3LatentImage", "latent/sd3")
        },
        ClassDef {
            outputs: vec![("LATENT", "LATENT")],
            required: vec![
                ("model", link("MODEL")),
                ("seed", seed()),
                ("steps", steps()),
                ("cfg", cfg()),
                ("sampler_name", combo(SAMPLERS)),
                ("scheduler", combo(SCHEDULERS)),
                ("positive", link("CONDITIONING")),
                ("negative", link("CONDITIONING")),
                ("latent_image", link("LATENT")),
                ("denoise", float(1.0, 0.0, 1.0, 0.01)),
            ],
            ..base("KSampler", "sampling")
        },
        ClassDef {
            display_name: Some("KSampler (Advanced)"),
            outputs: vec![("LATENT", "LATENT")],
            required: vec![
                ("model", link("MODEL")),
                ("add_noise", combo(&["enable", "disable"])),
                ("noise_seed", seed()),
                ("steps", steps()),
                ("cfg", cfg()),
                ("sampler_name", combo(SAMPLERS)),
                ("scheduler", combo(SCHEDULERS)),
                ("positive", link("CONDITIONING")),
                ("negative", link("CONDITIONING")),
                ("latent_image", link("LATENT")),
                ("start_at_step", int(0, 0, 10000, None)),
                ("end_at_step", int(10000, 0, 10000, None)),
                ("return_with_leftover_noise", combo(&["disable", "enable"])),
            ],
            ..base("KSamplerAdvanced", "sampling")
        },
        ClassDef {
            python_module: "comfy_extras.nodes_wan",
            outputs: vec![
                ("CONDITIONING", "positive"),
                ("CONDITIONING", "negative"),
                ("LATENT", "latent"),
            ],
            required: vec![
                ("positive", link("CONDITIONING")),
                ("negative", link("CONDITIONING")),
                ("vae", link("VAE")),
                ("width", latent_size(832, 16)),
                ("height", latent_size(480, 16)),
                ("length", int(81, 1, 16384, Some(4))),
                ("batch_size", int(1, 1, 4096, None)),
            ],
            optional: vec![
                ("clip_vision_output", link("CLIP_VISION_OUTPUT")),
                ("start_image", link("IMAGE")),
            ],
            ..base("WanImageToVideo", "conditioning/video_models")
        },
        ClassDef {
            display_name: Some("VAE Decode"),
            outputs: vec![("IMAGE", "IMAGE")],
            required: vec![("samples", link("LATENT")), ("vae", link("VAE"))],
            ..base("VAEDecode", "latent")
        },
    ]
}

/// A V3 (`io.Schema`) input of a link type: `["MODEL", {}]`.
fn v3_link(kind: &str) -> Spec {
    fixed(json!([kind, {}]))
}

/// A V3 combo, which object_info lists as `["COMBO", {"options": [...]}]`.
fn v3_combo(choices: &[&str]) -> Spec {
    fixed(json!(["COMBO", {"options": choices}]))
}

/// The custom sampler nodes of `comfy_extras/nodes_custom_sampler.py` (V3
/// schema) that ComfyUI's Flux dev example wires together.
fn custom_sampling_classes() -> Vec<ClassDef> {
    let v3 = |name, category| ClassDef {
        display_name: None,
        python_module: "comfy_extras.nodes_custom_sampler",
        v3: true,
        ..base(name, category)
    };
    vec![
        ClassDef {
            outputs: vec![("SIGMAS", "SIGMAS")],
            required: vec![
                ("model", v3_link("MODEL")),
                ("scheduler", v3_combo(SCHEDULERS)),
                (
                    "steps",
                    fixed(json!(["INT", {"default": 20, "min": 1, "max": 10000}])),
                ),
                (
                    "denoise",
                    fixed(json!(["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0,
                    "step": 0.01}])),
                ),
            ],
            ..v3("BasicScheduler", "sampling/schedulers")
        },
        ClassDef {
            outputs: vec![("SAMPLER", "SAMPLER")],
            required: vec![("sampler_name", v3_combo(SAMPLERS))],
            ..v3("KSamplerSelect", "sampling/samplers")
        },
        ClassDef {
            outputs: vec![("NOISE", "NOISE")],
            required: vec![(
                "noise_seed",
                fixed(json!(["INT", {"default": 0, "min": 0, "max": u64::MAX,
                "control_after_generate": true}])),
            )],
            ..v3("RandomNoise", "sampling/noise")
        },
        ClassDef {
            display_name: Some("Basic Guider"),
            outputs: vec![("GUIDER", "GUIDER")],
            required: vec![
                ("model", v3_link("MODEL")),
                ("conditioning", v3_link("CONDITIONING")),
            ],
            ..v3("BasicGuider", "sampling/guiders")
        },
        ClassDef {
            outputs: vec![("LATENT", "output"), ("LATENT", "denoised_output")],
            required: vec![
                ("noise", v3_link("NOISE")),
                ("guider", v3_link("GUIDER")),
                ("sampler", v3_link("SAMPLER")),
                ("sigmas", v3_link("SIGMAS")),
                ("latent_image", v3_link("LATENT")),
            ],
            ..v3("SamplerCustomAdvanced", "sampling/custom_sampling")
        },
    ]
}

fn saving_classes() -> Vec<ClassDef> {
    let output = |name| ClassDef {
        output_node: true,
        hidden_prompt: true,
        ..base(name, "image")
    };
    vec![
        ClassDef {
            display_name: Some("Save Image"),
            description: "Saves the input images to your ComfyUI output directory.",
            required: vec![
                (
                    "images",
                    fixed(json!(["IMAGE", {"tooltip": "The images to save."}])),
                ),
                ("filename_prefix", prefix()),
            ],
            ..output("SaveImage")
        },
        ClassDef {
            display_name: Some("Preview Image"),
            description: "Saves the input images to your ComfyUI output directory.",
            required: vec![("images", link("IMAGE"))],
            ..output("PreviewImage")
        },
        ClassDef {
            python_module: "custom_nodes.websocket_image_save",
            required: vec![("images", link("IMAGE"))],
            hidden_prompt: false,
            category: "api/image",
            ..output("SaveImageWebsocket")
        },
        ClassDef {
            required: vec![
                ("images", link("IMAGE")),
                (
                    "filename_prefix",
                    fixed(json!(["STRING", {"default": "ComfyUI"}])),
                ),
                ("fps", float(6.0, 0.01, 1000.0, 0.01)),
                ("compress_level", int(4, 0, 9, None)),
            ],
            category: "image/animation",
            ..output("SaveAnimatedPNG")
        },
        ClassDef {
            required: vec![
                ("images", link("IMAGE")),
                (
                    "filename_prefix",
                    fixed(json!(["STRING", {"default": "ComfyUI"}])),
                ),
                ("fps", float(6.0, 0.01, 1000.0, 0.01)),
                ("lossless", fixed(json!(["BOOLEAN", {"default": true}]))),
                ("quality", int(80, 0, 100, None)),
                ("method", combo(&["default", "fastest", "slowest"])),
            ],
            category: "image/animation",
            ..output("SaveAnimatedWEBP")
        },
    ]
}
