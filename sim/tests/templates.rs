//! Runs Multiplex's own workflow templates (config/templates) against the
//! ComfyUI simulator over real sockets, exactly as the daemon submits them:
//! the Flux dev example with its custom sampler nodes, and Wan 2.1
//! image-to-video from an uploaded start frame.

use std::{path::PathBuf, time::Duration};

use awc::ws::Frame;
use futures_util::StreamExt;
use multiplex_sim::{
    media::{self, clamp_size},
    ComfySim, ComfySimConfig,
};
use serde_json::{json, Value};

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

const WAIT: Duration = Duration::from_secs(20);

fn template(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../config/templates")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("template is JSON")
}

/// The template's prompt with every parameter set: `values` first, then
/// the parameter's default; parameters with neither keep the template's
/// literal.
fn fill(template: &Value, values: &[(&str, Value)]) -> Value {
    let mut prompt = template["prompt"].clone();
    let parameters = template["parameters"].as_object().expect("parameters");
    for (name, parameter) in parameters {
        let given = values.iter().find(|(n, _)| n == name).map(|(_, v)| v);
        let Some(value) = given.or(parameter.get("default")) else {
            continue;
        };
        let targets = match parameter.get("targets") {
            Some(Value::Array(targets)) => targets.clone(),
            _ => vec![json!({"node": parameter["node"], "input": parameter["input"]})],
        };
        for target in targets {
            let (node, input) = (target["node"].as_str(), target["input"].as_str());
            let (Some(node), Some(input)) = (node, input) else {
                panic!("parameter {name} has a bad target {target}");
            };
            let inputs = prompt[node]["inputs"]
                .as_object_mut()
                .unwrap_or_else(|| panic!("parameter {name} targets missing node {node}"));
            assert!(
                inputs.contains_key(input),
                "{name} targets {node}.{input}, which the template lacks"
            );
            inputs.insert(input.to_owned(), value.clone());
        }
    }
    prompt
}

fn config() -> ComfySimConfig {
    ComfySimConfig {
        step_ms: 1,
        model_load_ms: 1,
        preview_bytes: 4096,
        ..ComfySimConfig::default()
    }
}

async fn start() -> ComfySim {
    let addr = "127.0.0.1:0".parse().expect("literal address");
    ComfySim::start(config(), addr)
        .await
        .expect("simulator starts")
}

async fn connect(sim: &ComfySim, client_id: &str) -> Socket {
    let url = format!("ws://{}/ws?clientId={client_id}", sim.addr());
    let (_, socket) = awc::Client::new()
        .ws(url)
        .max_frame_size(8 << 20)
        .connect()
        .await
        .expect("websocket connects");
    socket
}

/// What one run showed on the socket.
#[derive(Default)]
struct Run {
    /// `(node, value, max)` of every `progress` message.
    progress: Vec<(String, u64, u64)>,
    previews: usize,
    errors: Vec<Value>,
}

/// Reads messages of `prompt_id` until its `executing` with `node: null`.
async fn watch(socket: &mut Socket, prompt_id: &str) -> Run {
    let mut run = Run::default();
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame arrives in time")
            .expect("socket open")
            .expect("valid frame");
        let message: Value = match frame {
            Frame::Text(text) => serde_json::from_slice(&text).unwrap(),
            Frame::Binary(bytes) => {
                assert_eq!(&bytes[..4], &[0, 0, 0, 1], "a plain preview frame");
                assert_eq!(&bytes[8..16], b"\x89PNG\r\n\x1a\n");
                run.previews += 1;
                continue;
            }
            _ => continue,
        };
        let data = &message["data"];
        if data.get("prompt_id").is_some_and(|id| id != prompt_id) {
            continue;
        }
        match message["type"].as_str().unwrap_or_default() {
            "progress" => run.progress.push((
                data["node"].as_str().unwrap().to_owned(),
                data["value"].as_u64().unwrap(),
                data["max"].as_u64().unwrap(),
            )),
            "execution_error" => run.errors.push(data.clone()),
            "executing" if data["node"].is_null() => return run,
            _ => {}
        }
    }
}

async fn submit(sim: &ComfySim, prompt: &Value, client_id: &str) -> String {
    let response = reqwest::Client::new()
        .post(sim.url().join("prompt").unwrap())
        .json(&json!({"prompt": prompt, "client_id": client_id}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "prompt refused: {answer}");
    assert_eq!(answer["node_errors"], json!({}));
    answer["prompt_id"].as_str().unwrap().to_owned()
}

async fn get_json(sim: &ComfySim, path: &str) -> Value {
    let url = sim.url().join(path).unwrap();
    let response = reqwest::get(url).await.unwrap();
    response.json().await.unwrap()
}

/// The bytes of the single file output node `node` saved.
async fn saved_file(sim: &ComfySim, prompt_id: &str, node: &str) -> (Value, Vec<u8>) {
    let history = get_json(sim, &format!("history/{prompt_id}")).await;
    let entry = &history[prompt_id];
    assert_eq!(entry["status"]["status_str"], "success", "{entry}");
    let output = entry["outputs"][node].clone();
    let images = output["images"].as_array().expect("images listed");
    assert_eq!(images.len(), 1, "{output}");
    let image = &images[0];
    let url = sim.url().join("view").unwrap();
    let response = reqwest::Client::new()
        .get(url)
        .query(&[
            ("filename", image["filename"].as_str().unwrap()),
            ("subfolder", image["subfolder"].as_str().unwrap()),
            ("type", image["type"].as_str().unwrap()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    (output, response.bytes().await.unwrap().to_vec())
}

/// Uploads `image` as a PNG and returns the name the server gave it.
async fn upload(sim: &ComfySim, name: &str, image: &media::Image) -> String {
    let png = media::encode_png(image, 0, &[]).unwrap();
    let part = reqwest::multipart::Part::bytes(png)
        .file_name(name.to_owned())
        .mime_str("image/png")
        .unwrap();
    let form = reqwest::multipart::Form::new().part("image", part);
    let uploaded: Value = reqwest::Client::new()
        .post(sim.url().join("upload/image").unwrap())
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    uploaded["name"].as_str().expect("upload named").to_owned()
}

fn assert_steps(run: &Run, node: &str, steps: u64) {
    let ticks: Vec<(u64, u64)> = run
        .progress
        .iter()
        .filter(|(n, _, _)| n == node)
        .map(|(_, value, max)| (*value, *max))
        .collect();
    let expected: Vec<(u64, u64)> = (1..=steps).map(|step| (step, steps)).collect();
    assert_eq!(ticks, expected, "progress of sampler {node}");
    assert_eq!(run.previews as u64, steps, "one preview per step");
}

#[actix_rt::test]
async fn object_info_lists_the_custom_sampler_nodes() {
    let sim = start().await;
    let info = get_json(&sim, "object_info").await;
    let outputs = |class: &str| info[class]["output"].clone();
    assert_eq!(outputs("ModelSamplingFlux"), json!(["MODEL"]));
    assert_eq!(outputs("RandomNoise"), json!(["NOISE"]));
    assert_eq!(outputs("KSamplerSelect"), json!(["SAMPLER"]));
    assert_eq!(outputs("BasicScheduler"), json!(["SIGMAS"]));
    assert_eq!(outputs("BasicGuider"), json!(["GUIDER"]));
    assert_eq!(
        outputs("SamplerCustomAdvanced"),
        json!(["LATENT", "LATENT"])
    );
    let advanced = &info["SamplerCustomAdvanced"];
    assert_eq!(
        advanced["output_name"],
        json!(["output", "denoised_output"])
    );
    assert_eq!(
        advanced["input_order"]["required"],
        json!(["noise", "guider", "sampler", "sigmas", "latent_image"])
    );
    let scheduler = &info["BasicScheduler"]["input"]["required"]["scheduler"];
    assert_eq!(scheduler[0], "COMBO");
    assert!(scheduler[1]["options"]
        .as_array()
        .unwrap()
        .contains(&json!("simple")));
    let seed = &info["RandomNoise"]["input"]["required"]["noise_seed"][1];
    assert_eq!(seed["max"], json!(u64::MAX));
    let flux = &info["ModelSamplingFlux"]["input"]["required"];
    assert_eq!(flux["max_shift"][1]["default"], json!(1.15));
    assert_eq!(flux["width"][1]["step"], json!(8));
    sim.stop().await;
}

#[actix_rt::test]
async fn flux_template_samples_a_real_png() {
    let sim = start().await;
    let mut socket = connect(&sim, "flux").await;
    let flux = template("flux-txt2img.json");
    let text = "a lighthouse on a cliff at dusk";
    let prompt = fill(&flux, &[("prompt", json!(text))]);
    assert_eq!(prompt["25"]["inputs"]["noise_seed"], json!(0));
    assert_eq!(prompt["17"]["inputs"]["steps"], json!(20));

    let id = submit(&sim, &prompt, "flux").await;
    let run = watch(&mut socket, &id).await;
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    assert_steps(&run, "13", 20);

    let (_, bytes) = saved_file(&sim, &id, "9").await;
    let info = media::probe(&bytes).expect("a known format");
    let (w, h) = clamp_size(1024, 1024);
    assert_eq!(
        (info.format, info.width, info.height, info.frames),
        ("png", w, h, 1)
    );
    let picture = media::decode_png(&bytes).expect("a decodable PNG");
    assert_eq!(
        picture.frames[0],
        media::pattern(w, h, text, 0),
        "the picture is drawn from the conditioning's text and RandomNoise's seed"
    );

    // Another seed through RandomNoise gives another picture.
    let reseeded = fill(&flux, &[("prompt", json!(text)), ("seed", json!(42))]);
    let id = submit(&sim, &reseeded, "flux").await;
    let run = watch(&mut socket, &id).await;
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    let (_, other) = saved_file(&sim, &id, "9").await;
    let other = media::decode_png(&other).unwrap();
    assert_eq!(other.frames[0], media::pattern(w, h, text, 42));
    assert_ne!(other.frames[0], picture.frames[0]);

    // BasicScheduler's steps drive the sampler's progress.
    let short = fill(&flux, &[("prompt", json!(text)), ("steps", json!(3))]);
    let id = submit(&sim, &short, "flux").await;
    let run = watch(&mut socket, &id).await;
    assert_steps(&run, "13", 3);
    sim.stop().await;
}

#[actix_rt::test]
async fn wan_template_animates_an_uploaded_image() {
    let sim = start().await;
    let mut socket = connect(&sim, "wan").await;
    let start_frame = media::Image::solid(64, 40, 1, [200, 120, 30]);
    let name = upload(&sim, "wan-start.png", &start_frame).await;

    let wan = template("wan21-i2v.json");
    let prompt = fill(&wan, &[("image", json!(name))]);
    assert_eq!(prompt["50"]["inputs"]["length"], json!(33));
    let id = submit(&sim, &prompt, "wan").await;
    let run = watch(&mut socket, &id).await;
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    assert_steps(&run, "3", 20);

    let (output, bytes) = saved_file(&sim, &id, "28").await;
    assert_eq!(output["animated"], json!([true]));
    let info = media::probe(&bytes).expect("a known format");
    let (w, h) = clamp_size(832, 480);
    assert_eq!((info.format, info.width, info.height), ("png", w, h));
    assert!(info.frames > 1, "an animation, not a still: {info:?}");
    sim.stop().await;
}

#[actix_rt::test]
async fn invert_template_inverts_an_uploaded_image() {
    let sim = start().await;
    let mut socket = connect(&sim, "invert").await;
    let source = media::Image::solid(24, 16, 1, [10, 100, 250]);
    let name = upload(&sim, "to-invert.png", &source).await;
    let prompt = fill(&template("invert-image.json"), &[("image", json!(name))]);
    let id = submit(&sim, &prompt, "invert").await;
    let run = watch(&mut socket, &id).await;
    assert!(run.errors.is_empty(), "{:?}", run.errors);
    let (_, bytes) = saved_file(&sim, &id, "3").await;
    let picture = media::decode_png(&bytes).expect("a decodable PNG");
    assert_eq!(picture.frames[0], media::invert(&source).frames[0]);
    sim.stop().await;
}
