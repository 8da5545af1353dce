//! Drives the ComfyUI simulator over real sockets and checks it against the
//! recordings: message order (a_basic, d_cached, e_interrupt, h_ws_binary),
//! error bodies (c_invalid), uploads (b_upload) and history while running.

use std::{net::SocketAddr, time::Duration};

use actix_web::web::Bytes;
use awc::ws::Frame;
use futures_util::{SinkExt, StreamExt};
use multiplex_sim::{comfyui::ComfyControl, ComfySim, ComfySimConfig};
use serde_json::{json, Value};

type Socket = actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>;

const WAIT: Duration = Duration::from_secs(10);

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().expect("literal address")
}

async fn start(config: ComfySimConfig) -> ComfySim {
    ComfySim::start(config, any_port())
        .await
        .expect("simulator starts")
}

fn fast() -> ComfySimConfig {
    ComfySimConfig {
        step_ms: 1,
        model_load_ms: 1,
        ..ComfySimConfig::default()
    }
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

enum Received {
    Text(Value),
    Binary(Bytes),
}

async fn receive(socket: &mut Socket) -> Received {
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame arrives in time")
            .expect("socket open")
            .expect("valid frame");
        match frame {
            Frame::Text(text) => return Received::Text(serde_json::from_slice(&text).unwrap()),
            Frame::Binary(bytes) => return Received::Binary(bytes),
            _ => continue,
        }
    }
}

async fn text(socket: &mut Socket) -> Value {
    match receive(socket).await {
        Received::Text(value) => value,
        Received::Binary(_) => panic!("expected a text frame"),
    }
}

/// The recordings' summary notation: `executing(1)`, `status(q=0)`...
fn summarize(message: &Value) -> String {
    let data = &message["data"];
    match message["type"].as_str().unwrap_or_default() {
        "status" => format!(
            "status(q={})",
            data["status"]["exec_info"]["queue_remaining"]
        ),
        "executing" => match data["node"].as_str() {
            Some(node) => format!("executing({node})"),
            None => "executing(None)".into(),
        },
        "executed" => format!("executed({})", data["node"].as_str().unwrap()),
        "execution_cached" => {
            let nodes: Vec<String> = data["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| format!("'{}'", n.as_str().unwrap()))
                .collect();
            format!("execution_cached([{}])", nodes.join(", "))
        }
        "progress_state" => {
            let mut nodes: Vec<(&String, &Value)> =
                data["nodes"].as_object().unwrap().iter().collect();
            nodes.sort_by_key(|(id, _)| id.parse::<u32>().unwrap_or(0));
            let parts: Vec<String> = nodes
                .iter()
                .map(|(id, n)| format!("{id}:{}", n["state"].as_str().unwrap()))
                .collect();
            format!("progress_state({})", parts.join(","))
        }
        "progress" => format!("progress({})", data["node"].as_str().unwrap()),
        other => other.to_owned(),
    }
}

/// Reads until `executing` with `node: null`, returning the summaries.
async fn until_done(socket: &mut Socket) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        match receive(socket).await {
            Received::Text(message) => {
                seen.push(summarize(&message));
                if message["type"] == "executing" && message["data"]["node"].is_null() {
                    return seen;
                }
            }
            Received::Binary(bytes) => seen.push(format!("<binary {}>", bytes[3])),
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn post_prompt(sim: &ComfySim, body: Value) -> (u16, Value) {
    let response = http()
        .post(sim.url().join("prompt").unwrap())
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_json(sim: &ComfySim, path: &str) -> Value {
    http()
        .get(sim.url().join(path).unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `POST /sim/control` with `change`; answers the stats after it.
async fn control(sim: &ComfySim, change: Value) -> Value {
    http()
        .post(sim.url().join("sim/control").unwrap())
        .json(&change)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls `path` until `ready` holds, failing after [`WAIT`].
async fn poll(sim: &ComfySim, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let value = get_json(sim, path).await;
        if ready(&value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never became ready: {value}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn basic_graph(prefix: &str, color: u32) -> Value {
    json!({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    })
}

fn sampler_graph(steps: u32) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 96, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 7, "steps": steps,
              "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0],
              "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "fox"}},
    })
}

#[actix_rt::test]
async fn basic_run_follows_the_recorded_sequence() {
    let sim = start(fast()).await;
    let mut socket = connect(&sim, "main").await;
    let first = text(&mut socket).await;
    assert_eq!(first["data"]["sid"], "main");
    assert_eq!(summarize(&first), "status(q=0)");

    let (status, answer) = post_prompt(
        &sim,
        json!({"prompt": basic_graph("rec_a", 0xff8000), "client_id": "main"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(answer["number"], 0);
    assert_eq!(answer["node_errors"], json!({}));
    let id = answer["prompt_id"].as_str().unwrap().to_owned();

    let expected = [
        "status(q=1)",
        "status(q=1)",
        "execution_start",
        "execution_cached([])",
        "progress_state(1:running)",
        "executing(1)",
        "progress_state(1:finished)",
        "progress_state(1:finished,2:running)",
        "executing(2)",
        "progress_state(1:finished,2:finished)",
        "progress_state(1:finished,2:finished,3:running)",
        "executing(3)",
        "executed(3)",
        "progress_state(1:finished,2:finished,3:finished)",
        "execution_success",
        "status(q=0)",
        "executing(None)",
    ];
    assert_eq!(until_done(&mut socket).await, expected);

    let history = get_json(&sim, &format!("history/{id}")).await;
    let entry = &history[&id];
    assert_eq!(entry["prompt"][0], 0);
    assert_eq!(entry["prompt"][3], json!({"client_id": "main"}));
    assert_eq!(entry["prompt"][4], json!(["3"]));
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["status"]["messages"].as_array().unwrap().len(), 3);
    assert_eq!(entry["meta"]["3"]["real_node_id"], "3");
    let image = &entry["outputs"]["3"]["images"][0];
    assert_eq!(
        image,
        &json!({"filename": "rec_a_00001_.png", "subfolder": "", "type": "output"})
    );

    let view = http()
        .get(
            sim.url()
                .join("view?filename=rec_a_00001_.png&subfolder=&type=output")
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(view.status(), 200);
    assert_eq!(view.headers()["content-type"], "image/png");
    assert_eq!(
        view.headers()["content-disposition"],
        "filename=\"rec_a_00001_.png\""
    );
    let png = multiplex_sim::media::decode_png(&view.bytes().await.unwrap()).unwrap();
    assert_eq!((png.width, png.height), (64, 64));
    assert_eq!(&png.frames[0][..3], &[0x00, 0x7f, 0xff], "orange inverted");

    let missing = http()
        .get(
            sim.url()
                .join("api/view?filename=nope.png&type=output")
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert!(missing.bytes().await.unwrap().is_empty());
    assert_eq!(
        get_json(&sim, "api/queue").await,
        json!({"queue_running": [], "queue_pending": []})
    );
    sim.stop().await;
}

#[actix_rt::test]
async fn invalid_prompts_get_comfyui_error_bodies() {
    let sim = start(fast()).await;
    let mut graph = basic_graph("c", 0);
    graph["2"]["inputs"] = json!({});
    let (status, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(
        body["node_errors"]["2"],
        json!({"errors": [{"type": "required_input_missing", "message": "Required input is missing",
            "details": "image", "extra_info": {"input_name": "image"}}],
            "dependent_outputs": ["3"], "class_type": "ImageInvert"})
    );

    let mut graph = basic_graph("c", 0);
    graph["2"]["class_type"] = json!("NoSuchNodeXYZ");
    let (status, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        json!({"type": "invalid_prompt",
            "message": "Cannot execute because node NoSuchNodeXYZ does not exist.",
            "details": "Node ID '#2'", "extra_info": {}})
    );

    let mut graph = basic_graph("c", 0);
    graph["1"]["inputs"]["width"] = json!(0);
    let (_, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    let error = &body["node_errors"]["1"]["errors"][0];
    assert_eq!(error["type"], "value_smaller_than_min");
    assert_eq!(error["message"], "Value 0 smaller than min of 1");
    assert_eq!(error["extra_info"]["input_config"][1]["max"], 16384);

    let mut graph = basic_graph("c", 0);
    graph["1"]["inputs"]["width"] = json!("wide");
    let (_, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    let error = &body["node_errors"]["1"]["errors"][0];
    assert_eq!(
        error["details"],
        "width, wide, invalid literal for int() with base 10: 'wide'"
    );

    let graph = json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
              "color": 0}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "magic",
              "width": 4, "height": 4, "crop": "disabled"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}},
    });
    let (_, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    assert_eq!(
        body["node_errors"]["2"]["errors"][0]["details"],
        "upscale_method: 'magic' not in ['nearest-exact', 'bilinear', 'area', 'bicubic', 'lanczos']"
    );

    let graph = json!({
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["77", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "c"}},
    });
    let (_, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    let error = &body["node_errors"]["2"]["errors"][0];
    assert_eq!(error["type"], "exception_during_inner_validation");
    assert_eq!(error["extra_info"]["input_name"], "images");

    let graph = json!({"1": {"class_type": "LoadImage", "inputs": {"image": "no_such_file.png"}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "c"}}});
    let (_, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["details"],
        "image - Invalid image file: no_such_file.png"
    );

    let (status, body) = post_prompt(&sim, json!({"client_id": "x"})).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (400, Some("no_prompt"))
    );
    let (status, body) = post_prompt(&sim, json!({"prompt": {}})).await;
    assert_eq!(
        (status, body["error"]["type"].as_str()),
        (400, Some("prompt_no_outputs"))
    );

    let malformed = http()
        .post(sim.url().join("prompt").unwrap())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), 500);
    assert_eq!(
        malformed.headers()["content-type"],
        "text/plain; charset=utf-8"
    );

    // A partly invalid prompt runs its valid branch and answers 200.
    let mut graph = basic_graph("c_bad", 0);
    graph["2"]["inputs"] = json!({});
    graph["4"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}});
    let (status, body) = post_prompt(&sim, json!({"prompt": graph})).await;
    assert_eq!(status, 200);
    assert_eq!(body["node_errors"]["2"]["dependent_outputs"], json!(["3"]));
    assert_eq!(body["number"], 9, "every parsed submission takes a number");
    assert_eq!(sim.prompts_received(), 11);
    sim.stop().await;
}

async fn upload(sim: &ComfySim, name: &str, bytes: Vec<u8>, fields: &[(&str, &str)]) -> Value {
    let part = reqwest::multipart::Part::bytes(bytes)
        .file_name(name.to_owned())
        .mime_str("image/png")
        .unwrap();
    let mut form = reqwest::multipart::Form::new().part("image", part);
    for (key, value) in fields {
        form = form.text((*key).to_owned(), (*value).to_owned());
    }
    let url = sim.url().join("upload/image").unwrap();
    http()
        .post(url)
        .multipart(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn small_png(width: u32, height: u32, shade: u8) -> Vec<u8> {
    let image = multiplex_sim::media::Image::solid(width, height, 1, [shade, 10, 200]);
    multiplex_sim::media::encode_png(&image, 0, &[]).unwrap()
}

#[actix_rt::test]
async fn uploads_dedup_rename_and_feed_load_image() {
    let sim = start(fast()).await;
    let first = upload(
        &sim,
        "rec_input.png",
        small_png(32, 24, 1),
        &[("overwrite", "true")],
    )
    .await;
    assert_eq!(
        first,
        json!({"name": "rec_input.png", "subfolder": "", "type": "input"})
    );
    let same = upload(
        &sim,
        "rec_input.png",
        small_png(32, 24, 1),
        &[("type", "input")],
    )
    .await;
    assert_eq!(same["name"], "rec_input.png");
    let clash = upload(&sim, "rec_input.png", small_png(32, 24, 2), &[]).await;
    assert_eq!(clash["name"], "rec_input (1).png");
    let sub = upload(
        &sim,
        "rec_sub.png",
        small_png(8, 8, 3),
        &[("subfolder", "recsub")],
    )
    .await;
    assert_eq!(
        sub,
        json!({"name": "rec_sub.png", "subfolder": "recsub", "type": "input"})
    );

    let graph = json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": "rec_input.png"}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0],
              "upscale_method": "bilinear", "width": 64, "height": 48, "crop": "disabled"}},
        "3": {"class_type": "SaveImage",
              "inputs": {"images": ["2", 0], "filename_prefix": "rec_b"}},
    });
    let (status, answer) = post_prompt(&sim, json!({"prompt": graph})).await;
    assert_eq!(status, 200);
    let id = answer["prompt_id"].as_str().unwrap().to_owned();
    let history = poll(&sim, &format!("history/{id}"), |h| h.get(&id).is_some()).await;
    assert_eq!(
        history[&id]["outputs"]["3"]["images"][0]["filename"],
        "rec_b_00001_.png"
    );
    let bytes = http()
        .get(
            sim.url()
                .join("view?filename=rec_b_00001_.png&type=output")
                .unwrap(),
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let image = multiplex_sim::media::decode_png(&bytes).unwrap();
    assert_eq!((image.width, image.height), (64, 48));
    sim.stop().await;
}

#[actix_rt::test]
async fn history_is_empty_while_a_prompt_runs() {
    let sim = start(ComfySimConfig {
        step_ms: 40,
        ..fast()
    })
    .await;
    let prompt_id = "0b7c0e1e-0000-4000-8000-000000000001";
    let body = json!({"prompt": sampler_graph(10), "prompt_id": prompt_id});
    let (_, answer) = post_prompt(&sim, body).await;
    assert_eq!(answer["prompt_id"], prompt_id, "client-chosen ids are kept");
    poll(&sim, "queue", |q| {
        q["queue_running"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    assert_eq!(
        get_json(&sim, &format!("history/{prompt_id}")).await,
        json!({})
    );
    assert_eq!(get_json(&sim, "history/unknown-id").await, json!({}));
    let done = poll(&sim, &format!("history/{prompt_id}"), |h| {
        h.get(prompt_id).is_some()
    })
    .await;
    assert_eq!(done[prompt_id]["status"]["status_str"], "success");
    sim.stop().await;
}

#[actix_rt::test]
async fn previews_are_large_binary_frames() {
    let sim = start(ComfySimConfig {
        preview_bytes: 100_000,
        ..fast()
    })
    .await;
    let mut plain = connect(&sim, "plain").await;
    text(&mut plain).await;
    post_prompt(
        &sim,
        json!({"prompt": sampler_graph(2), "client_id": "plain"}),
    )
    .await;
    let mut frames = Vec::new();
    let mut order = Vec::new();
    loop {
        match receive(&mut plain).await {
            Received::Binary(bytes) => {
                order.push("binary".to_owned());
                frames.push(bytes);
            }
            Received::Text(message) => {
                order.push(summarize(&message));
                if message["type"] == "executing" && message["data"]["node"].is_null() {
                    break;
                }
            }
        }
    }
    assert_eq!(frames.len(), 2);
    for frame in &frames {
        assert!(frame.len() > 64 * 1024, "frame of {} bytes", frame.len());
        assert_eq!(&frame[..8], &[0, 0, 0, 1, 0, 0, 0, 2]);
        assert_eq!(&frame[8..16], b"\x89PNG\r\n\x1a\n");
    }
    let at = order.iter().position(|s| s == "binary").unwrap();
    assert_eq!(
        order[at - 1],
        "progress(5)",
        "plain clients get progress then the preview"
    );

    let mut flagged = connect(&sim, "flags").await;
    text(&mut flagged).await;
    let flags = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
    flagged
        .send(awc::ws::Message::Text(flags.to_string().into()))
        .await
        .unwrap();
    assert_eq!(text(&mut flagged).await["type"], "feature_flags");
    let mut graph = sampler_graph(2);
    graph["5"]["inputs"]["seed"] = json!(8);
    post_prompt(&sim, json!({"prompt": graph, "client_id": "flags"})).await;
    let frame = loop {
        if let Received::Binary(bytes) = receive(&mut flagged).await {
            break bytes;
        }
    };
    assert_eq!(&frame[..4], &[0, 0, 0, 4]);
    let length = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
    let metadata: Value = serde_json::from_slice(&frame[8..8 + length]).unwrap();
    assert_eq!(metadata["node_id"], "5");
    assert_eq!(metadata["image_type"], "image/png");
    assert_eq!(&frame[8 + length..16 + length], b"\x89PNG\r\n\x1a\n");
    sim.stop().await;
}

#[actix_rt::test]
async fn reruns_are_cached() {
    let sim = start(fast()).await;
    let mut socket = connect(&sim, "main").await;
    text(&mut socket).await;
    let body = json!({"prompt": basic_graph("rec_d", 0x123456), "client_id": "main"});
    post_prompt(&sim, body.clone()).await;
    until_done(&mut socket).await;
    post_prompt(&sim, body).await;
    let expected = [
        "status(q=1)",
        "status(q=1)",
        "execution_start",
        "execution_cached(['1', '2', '3'])",
        "executed(3)",
        "progress_state(3:finished)",
        "execution_success",
        "status(q=0)",
        "executing(None)",
    ];
    assert_eq!(until_done(&mut socket).await, expected);
    post_prompt(
        &sim,
        json!({"prompt": basic_graph("rec_d2", 0x123456), "client_id": "main"}),
    )
    .await;
    let partial = until_done(&mut socket).await;
    assert_eq!(partial[3], "execution_cached(['1', '2'])");
    assert_eq!(partial[4], "progress_state(3:running)");
    sim.stop().await;
}

#[actix_rt::test]
async fn interrupt_lands_at_the_next_node() {
    let sim = start(ComfySimConfig {
        step_ms: 30,
        ..fast()
    })
    .await;
    let mut socket = connect(&sim, "main").await;
    text(&mut socket).await;
    let (_, answer) = post_prompt(
        &sim,
        json!({"prompt": basic_graph("rec_e", 1), "client_id": "main"}),
    )
    .await;
    loop {
        let message = text(&mut socket).await;
        if summarize(&message) == "executing(1)" {
            break;
        }
    }
    let url = sim.url().join("interrupt").unwrap();
    http()
        .post(url)
        .json(&json!({"prompt_id": answer["prompt_id"]}))
        .send()
        .await
        .unwrap();
    let rest = until_done(&mut socket).await;
    assert_eq!(
        rest,
        [
            "progress_state(1:finished)",
            "progress_state(1:finished,2:running)",
            "executing(2)",
            "execution_interrupted",
            "status(q=0)",
            "executing(None)",
        ]
    );
    let id = answer["prompt_id"].as_str().unwrap();
    let history = get_json(&sim, &format!("history/{id}")).await;
    assert_eq!(history[id]["status"]["status_str"], "error");
    sim.stop().await;
}

#[actix_rt::test]
async fn switches_inject_failures() {
    let sim = start(fast()).await;
    let mut socket = connect(&sim, "main").await;
    text(&mut socket).await;
    sim.control(ComfyControl {
        oom_next: Some(1),
        ..ComfyControl::default()
    });
    post_prompt(
        &sim,
        json!({"prompt": sampler_graph(2), "client_id": "main"}),
    )
    .await;
    let error = loop {
        let message = text(&mut socket).await;
        if message["type"] == "execution_error" {
            break message;
        }
    };
    assert_eq!(error["data"]["exception_type"], "torch.OutOfMemoryError");
    assert_eq!(error["data"]["node_id"], "5");
    assert!(error["data"]["exception_message"]
        .as_str()
        .unwrap()
        .contains("Allocation on device"));

    let stats = control(&sim, json!({"restart": true})).await;
    assert_eq!(stats["prompts_received"], 1);
    assert_eq!(
        get_json(&sim, "history").await,
        json!({}),
        "a restart forgets history"
    );

    sim.control(ComfyControl {
        refuse_ws: Some(true),
        ..ComfyControl::default()
    });
    let refused = awc::Client::new()
        .ws(format!("ws://{}/ws", sim.addr()))
        .connect()
        .await;
    assert!(refused.is_err());
    sim.stop().await;
}

#[actix_rt::test]
async fn foreign_origins_are_refused() {
    let sim = start(fast()).await;
    let url = sim.url().join("api/system_stats").unwrap();
    let foreign = http()
        .get(url.clone())
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    let same = format!("http://{}", sim.addr());
    let ok = http().get(url).header("origin", same).send().await.unwrap();
    let stats: Value = ok.json().await.unwrap();
    assert_eq!(stats["devices"][0]["vram_total"], 24_576u64 * 1024 * 1024);
    sim.stop().await;
}

fn wan_graph(image: &str, saver: &str) -> Value {
    json!({
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": "wan.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": "umt5.safetensors", "type": "wan", "device": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_vae.safetensors"}},
        "4": {"class_type": "CLIPVisionLoader",
              "inputs": {"clip_name": "clip_vision_h.safetensors"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "CLIPVisionEncode",
              "inputs": {"clip_vision": ["4", 0], "image": ["5", 0], "crop": "none"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a slow pan", "clip": ["2", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "9": {"class_type": "WanImageToVideo", "inputs": {"positive": ["7", 0],
              "negative": ["8", 0], "vae": ["3", 0], "clip_vision_output": ["6", 0],
              "start_image": ["5", 0], "width": 64, "height": 48, "length": 9,
              "batch_size": 1}},
        "10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "11": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "seed": 1, "steps": 2,
               "cfg": 6.0, "sampler_name": "uni_pc", "scheduler": "simple",
               "positive": ["9", 0], "negative": ["9", 1], "latent_image": ["9", 2],
               "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["3", 0]}},
        "13": {"class_type": saver, "inputs": {"images": ["12", 0], "filename_prefix": "wan",
               "fps": 16.0, "lossless": false, "quality": 90, "method": "default",
               "compress_level": 4}},
    })
}

#[actix_rt::test]
async fn image_to_video_writes_real_animations() {
    let sim = start(fast()).await;
    upload(&sim, "start.png", small_png(32, 24, 9), &[]).await;
    for (saver, format) in [("SaveAnimatedPNG", "png"), ("SaveAnimatedWEBP", "webp")] {
        let (status, answer) =
            post_prompt(&sim, json!({"prompt": wan_graph("start.png", saver)})).await;
        assert_eq!(status, 200, "{answer}");
        let id = answer["prompt_id"].as_str().unwrap().to_owned();
        let history = poll(&sim, &format!("history/{id}"), |h| h.get(&id).is_some()).await;
        let output = &history[&id]["outputs"]["13"];
        assert_eq!(output["animated"], json!([true]));
        let name = output["images"][0]["filename"].as_str().unwrap();
        let url = sim
            .url()
            .join(&format!("view?filename={name}&type=output"))
            .unwrap();
        let bytes = http().get(url).send().await.unwrap().bytes().await.unwrap();
        let info = multiplex_sim::media::probe(&bytes).unwrap();
        assert_eq!(
            (info.format, info.width, info.height, info.frames),
            (format, 64, 48, 9)
        );
    }
    sim.stop().await;
}

#[actix_rt::test]
async fn a_reconnecting_client_learns_the_running_node() {
    let sim = start(ComfySimConfig {
        step_ms: 30,
        ..fast()
    })
    .await;
    let mut first = connect(&sim, "same").await;
    text(&mut first).await;
    post_prompt(
        &sim,
        json!({"prompt": sampler_graph(20), "client_id": "same"}),
    )
    .await;
    loop {
        if summarize(&text(&mut first).await) == "executing(5)" {
            break;
        }
    }
    drop(first);
    let mut second = connect(&sim, "same").await;
    let status = text(&mut second).await;
    assert_eq!(
        (summarize(&status), &status["data"]["sid"]),
        ("status(q=1)".into(), &json!("same"))
    );
    assert_eq!(
        text(&mut second).await,
        json!({"type": "executing", "data": {"node": "5"}})
    );
    let rest = until_done(&mut second).await;
    assert_eq!(rest.last().unwrap(), "executing(None)");
    assert!(rest.contains(&"execution_success".to_owned()));
    sim.stop().await;
}

#[actix_rt::test]
async fn dropped_and_stalled_sockets_still_finish_in_history() {
    let sim = start(fast()).await;
    let mut socket = connect(&sim, "main").await;
    text(&mut socket).await;
    sim.control(ComfyControl {
        drop_socket_next: Some(1),
        ..ComfyControl::default()
    });
    let (_, answer) = post_prompt(
        &sim,
        json!({"prompt": basic_graph("drop", 3), "client_id": "main"}),
    )
    .await;
    let closed = loop {
        match tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("socket reacts")
        {
            Some(Ok(Frame::Close(_))) | None | Some(Err(_)) => break true,
            Some(Ok(Frame::Text(text))) => {
                assert!(!String::from_utf8_lossy(&text).contains("execution_success"));
            }
            Some(Ok(_)) => {}
        }
    };
    assert!(closed);
    let id = answer["prompt_id"].as_str().unwrap().to_owned();
    poll(&sim, &format!("history/{id}"), |h| h.get(&id).is_some()).await;

    let mut quiet = connect(&sim, "quiet").await;
    text(&mut quiet).await;
    sim.control(ComfyControl {
        stall: Some(true),
        ..ComfyControl::default()
    });
    let (_, answer) = post_prompt(
        &sim,
        json!({"prompt": basic_graph("stall", 4), "client_id": "quiet"}),
    )
    .await;
    let id = answer["prompt_id"].as_str().unwrap().to_owned();
    poll(&sim, &format!("history/{id}"), |h| h.get(&id).is_some()).await;
    let silent = tokio::time::timeout(Duration::from_millis(100), quiet.next()).await;
    assert!(silent.is_err(), "a stalled server sends nothing");
    sim.stop().await;
}

/// Exactly-once checks: every POST counts against each id it names, ours in `extra_data`
/// included, and a simulated restart does not reset the counts.
#[actix_rt::test]
async fn stats_count_posts_per_prompt_id() {
    let sim = start(fast()).await;
    let ours = "5b0f8f0e-1111-4222-8333-944445555666";
    let body = json!({"prompt": basic_graph("dup", 1), "prompt_id": ours,
        "extra_data": {"multiplex_prompt_id": ours}});
    assert_eq!(post_prompt(&sim, body.clone()).await.0, 200);
    assert!(sim.duplicate_prompts().is_empty());
    sim.control(ComfyControl {
        restart: true,
        ..ComfyControl::default()
    });
    // An old server would mint its own id; ours is still counted from the extra data.
    let minted = json!({"prompt": basic_graph("dup", 1),
        "extra_data": {"multiplex_prompt_id": ours}});
    assert_eq!(post_prompt(&sim, minted).await.0, 200);
    assert_eq!(sim.prompts_by_id().get(ours), Some(&2));
    assert_eq!(sim.duplicate_prompts(), vec![ours.to_string()]);
    let stats = get_json(&sim, "sim/stats").await;
    assert_eq!(stats["prompts_by_id"][ours], 2);
    assert_eq!(stats["duplicate_prompts"], json!([ours]));
    sim.stop().await;
}

/// `mint_prompt_ids` plays an older ComfyUI: the client's prompt id is ignored and a UUID
/// minted, the extra data stays in the queue and history entries (so a client can still
/// find its prompt there), and `/interrupt` stops whatever runs whatever id it names.
#[actix_rt::test]
async fn minting_servers_ignore_the_clients_prompt_id() {
    let sim = start(ComfySimConfig {
        step_ms: 30,
        ..fast()
    })
    .await;
    let stats = control(&sim, json!({"mint_prompt_ids": true})).await;
    assert_eq!(stats["switches"]["mint_prompt_ids"], true);
    let mut socket = connect(&sim, "main").await;
    text(&mut socket).await;
    let ours = "0f1e2d3c-4b5a-4697-8877-665544332211";
    let (status, answer) = post_prompt(
        &sim,
        json!({"prompt": basic_graph("rec_m", 1), "client_id": "main", "prompt_id": ours,
            "extra_data": {"multiplex_prompt_id": ours}}),
    )
    .await;
    assert_eq!(status, 200);
    let minted = answer["prompt_id"].as_str().unwrap().to_string();
    assert_ne!(minted, ours);
    assert!(uuid::Uuid::parse_str(&minted).is_ok(), "{minted}");
    let queue = poll(&sim, "queue", |q| q["queue_running"][0].is_array()).await;
    let entry = &queue["queue_running"][0];
    assert_eq!(entry[1], minted.as_str());
    assert_eq!(
        entry[3],
        json!({"multiplex_prompt_id": ours, "client_id": "main"})
    );
    // A targeted interrupt naming someone else's id still stops ours: the body is ignored.
    let url = sim.url().join("interrupt").unwrap();
    http()
        .post(url)
        .json(&json!({"prompt_id": "someone-else"}))
        .send()
        .await
        .unwrap();
    until_done(&mut socket).await;
    let history = get_json(&sim, &format!("history/{minted}")).await;
    assert_eq!(history[&minted]["status"]["status_str"], "error");
    assert_eq!(history[&minted]["prompt"][3]["multiplex_prompt_id"], ours);
    assert_eq!(get_json(&sim, &format!("history/{ours}")).await, json!({}));
    assert_eq!(sim.interrupted_prompts(), vec![minted]);
    assert_eq!(sim.interrupts_received(), 1);
    assert_eq!(sim.prompts_by_id().get(ours), Some(&1));
    sim.stop().await;
}
