//! Step types: reading each node's `data`, and what the step consumes, produces and needs.
//!
//! Each step type turns its `data` into a private spec (what render needs later), a list of
//! input ports (what edges may feed it), the artifact kind it produces and its requirement.
//! Ports are what make handles meaningful: an edge lands on a port by its `targetHandle`, or,
//! without one, on the only port that accepts the artifact it carries.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::catalog::{Catalog, Requirement, Service, GENERIC_COMFY};
use super::comfy_graph;
use super::issue::{codes, describe, Issues};
use super::retry::{self, RetryOverride};
use super::template::{Template, TemplateKind};
use crate::artifact::ArtifactKind;

/// The type of a step, as the document's node `type` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StepKind {
    #[serde(rename = "intent")]
    Intent,
    #[serde(rename = "image")]
    Image,
    #[serde(rename = "video")]
    Video,
    #[serde(rename = "narration")]
    Narration,
    #[serde(rename = "output")]
    Output,
    #[serde(rename = "comfyui")]
    ComfyUi,
    #[serde(rename = "langflow")]
    LangFlow,
}

impl StepKind {
    pub const ALL: [StepKind; 7] = [
        StepKind::Intent,
        StepKind::Image,
        StepKind::Video,
        StepKind::Narration,
        StepKind::Output,
        StepKind::ComfyUi,
        StepKind::LangFlow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Intent => "intent",
            StepKind::Image => "image",
            StepKind::Video => "video",
            StepKind::Narration => "narration",
            StepKind::Output => "output",
            StepKind::ComfyUi => "comfyui",
            StepKind::LangFlow => "langflow",
        }
    }

    pub fn parse(name: &str) -> Option<StepKind> {
        StepKind::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

impl std::fmt::Display for StepKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `data` keys every step type accepts and ignores: what canvases keep for display.
const DISPLAY_KEYS: &[&str] = &["label", "title", "description", "notes", "comment", "color"];

/// LangFlow alias of the flow an `intent` step with `expand: true` runs.
pub const PROMPT_EXPANSION_FLOW: &str = "prompt-expansion";

/// VRAM estimates (MiB) for steps whose template gives none.
const DEFAULT_IMAGE_VRAM_MB: u64 = 16_000;
const DEFAULT_VIDEO_VRAM_MB: u64 = 24_000;
/// A generic graph that loads models: a modest guess; one that loads none: barely any.
const DEFAULT_GENERIC_VRAM_MB: u64 = 4_000;
const DEFAULT_MODELLESS_VRAM_MB: u64 = 512;

/// LangFlow input/output types.
const LANGFLOW_IO_TYPES: &[&str] = &["chat", "text", "any"];

/// Model file extensions, to spot model names in an inline graph's loader inputs.
const MODEL_EXTENSIONS: &[&str] = &[
    ".safetensors",
    ".ckpt",
    ".pt",
    ".pth",
    ".bin",
    ".gguf",
    ".sft",
];

/// An input of a step that edges feed.
#[derive(Debug, Clone)]
pub(crate) struct Port {
    /// The handle name (a template parameter, a binding placeholder, or a fixed name).
    pub name: String,
    pub accepts: Vec<ArtifactKind>,
    /// Must receive at least one edge.
    pub required: bool,
    /// At most this many edges; `None` for any number.
    pub max: Option<usize>,
    /// For a binding with `from`: the only step that may feed it.
    pub pinned: Option<String>,
    /// The data field that declares the port, for messages.
    pub field: String,
}

impl Port {
    fn new(name: &str, accepts: &[ArtifactKind], required: bool, max: Option<usize>) -> Port {
        Port {
            name: name.to_owned(),
            accepts: accepts.to_vec(),
            required,
            max,
            pinned: None,
            field: format!("inputs.{name}"),
        }
    }
}

/// Narration modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NarrationMode {
    Text,
    Visual,
}

/// A binding of an upstream artifact to a placeholder in a ComfyUI graph.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Binding {
    pub from: Option<String>,
    pub kind: Option<ArtifactKind>,
}

/// What a ComfyUI-backed step (image, video, comfyui) renders from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ComfySpec {
    /// The template's name; `None` for an inline graph.
    pub template: Option<String>,
    /// The inline graph, when there is no template.
    pub inline: Option<Value>,
    /// Checked literal parameter values, by parameter name.
    pub literals: BTreeMap<String, Value>,
    /// By placeholder (`$name`).
    pub bindings: BTreeMap<String, Binding>,
    pub output: ArtifactKind,
}

/// What rendering needs, per step type.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StepSpec {
    Intent {
        prompt: String,
        expand: bool,
    },
    Comfy(ComfySpec),
    Narration {
        mode: NarrationMode,
        flow: String,
        prompt: Option<String>,
    },
    Output,
    Langflow {
        flow: String,
        input: Option<String>,
        input_type: String,
        output_type: String,
        tweaks: Map<String, Value>,
    },
}

/// A node read and checked on its own, before edges are considered.
#[derive(Debug, Clone)]
pub(crate) struct StepDraft {
    pub kind: StepKind,
    pub spec: StepSpec,
    pub ports: Vec<Port>,
    pub produces: Option<ArtifactKind>,
    pub requirement: Option<Requirement>,
    /// What `data.retry` sets (nothing for steps that run in the daemon).
    pub retry: RetryOverride,
}

/// Reads one node's data. Returns `None` when the step is too broken to check its edges
/// (its issues are already recorded).
pub(crate) fn read(
    id: &str,
    kind: StepKind,
    data: &Map<String, Value>,
    catalog: &Catalog,
    issues: &mut Issues,
) -> Option<StepDraft> {
    // `retry` belongs to the step, not to its type: read it here and hide it from the
    // readers below (for image and video, every other key is a template parameter).
    let without_retry;
    let (data, retry) = match data.get("retry") {
        None => (data, RetryOverride::default()),
        Some(value) => {
            let mut rest = data.clone();
            rest.remove("retry");
            without_retry = rest;
            (&without_retry, read_retry(id, kind, data, value, issues))
        }
    };
    let mut reader = DataReader { id, data, issues };
    let draft = match kind {
        StepKind::Intent => read_intent(&mut reader),
        StepKind::Image => read_templated(&mut reader, catalog, TemplateKind::Image),
        StepKind::Video => read_templated(&mut reader, catalog, TemplateKind::Video),
        StepKind::Narration => read_narration(&mut reader),
        StepKind::Output => Some(StepDraft {
            kind,
            spec: StepSpec::Output,
            ports: vec![Port::new("in", &ALL_KINDS, true, None)],
            produces: None,
            requirement: None,
            retry: RetryOverride::default(),
        }),
        StepKind::ComfyUi => read_comfyui(&mut reader, catalog),
        StepKind::LangFlow => read_langflow(&mut reader),
    };
    draft.map(|draft| StepDraft { retry, ..draft })
}

/// Checks a step's `data.retry`. Steps that run remotely take it; an `output` ignores it
/// (its data is all ignored); an intent takes it only with `expand: true`, the one case in
/// which it runs on a node.
fn read_retry(
    id: &str,
    kind: StepKind,
    data: &Map<String, Value>,
    value: &Value,
    issues: &mut Issues,
) -> RetryOverride {
    let expand_off = matches!(
        data.get("expand"),
        None | Some(Value::Null) | Some(Value::Bool(false))
    );
    match kind {
        StepKind::Output => return RetryOverride::default(),
        StepKind::Intent if expand_off && !value.is_null() => {
            let message = format!(
                "intent '{id}' runs in the daemon, so retry does not apply; it applies with \
                 expand: true"
            );
            issues.node(codes::INVALID_PARAMETER, id, Some("data.retry"), message);
            return RetryOverride::default();
        }
        _ => {}
    }
    let (retry, problems) = retry::read(value);
    for problem in problems {
        let code = if problem.unknown {
            codes::UNKNOWN_PARAMETER
        } else {
            codes::INVALID_PARAMETER
        };
        let field = format!("data.{}", problem.field);
        let message = format!("step '{id}' {}", problem.message);
        issues.node(code, id, Some(&field), message);
    }
    retry
}

const ALL_KINDS: [ArtifactKind; 4] = [
    ArtifactKind::Text,
    ArtifactKind::Image,
    ArtifactKind::Video,
    ArtifactKind::Data,
];

/// Typed access to a node's data, reporting wrong types against the node.
struct DataReader<'a> {
    id: &'a str,
    data: &'a Map<String, Value>,
    issues: &'a mut Issues,
}

impl<'a> DataReader<'a> {
    fn invalid(&mut self, field: &str, message: String) {
        let field = format!("data.{field}");
        self.issues
            .node(codes::INVALID_PARAMETER, self.id, Some(&field), message);
    }

    fn missing(&mut self, field: &str, message: String) {
        let field = format!("data.{field}");
        self.issues
            .node(codes::MISSING_PARAMETER, self.id, Some(&field), message);
    }

    /// A present, non-null value.
    fn value(&self, key: &str) -> Option<&'a Value> {
        self.data.get(key).filter(|value| !value.is_null())
    }

    /// An optional string; a non-string is reported and treated as absent.
    fn string(&mut self, key: &str) -> Option<String> {
        match self.value(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                let message = format!(
                    "step '{}' {key} must be a string, got {}",
                    self.id,
                    describe(other)
                );
                self.invalid(key, message);
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, default: bool) -> bool {
        match self.value(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                let message = format!(
                    "step '{}' {key} must be true or false, got {}",
                    self.id,
                    describe(other)
                );
                self.invalid(key, message);
                default
            }
        }
    }

    /// An optional string limited to `choices`.
    fn choice(&mut self, key: &str, choices: &[&str], default: &str) -> String {
        match self.string(key) {
            None => default.to_owned(),
            Some(value) if choices.contains(&value.as_str()) => value,
            Some(value) => {
                let message = format!(
                    "step '{}' {key} must be one of {}, got {value:?}",
                    self.id,
                    choices.join(", ")
                );
                self.invalid(key, message);
                default.to_owned()
            }
        }
    }

    /// Reports every key that is neither in `known` nor a display key.
    fn reject_unknown(&mut self, known: &[&str]) {
        let unknown: Vec<&String> = self
            .data
            .keys()
            .filter(|key| !known.contains(&key.as_str()) && !is_display_key(key))
            .collect();
        for key in unknown {
            let field = format!("data.{key}");
            let message = format!(
                "step '{}' has no field {key:?} (it knows: {})",
                self.id,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            );
            self.issues
                .node(codes::UNKNOWN_PARAMETER, self.id, Some(&field), message);
        }
    }
}

fn is_display_key(key: &str) -> bool {
    DISPLAY_KEYS.contains(&key) || key.starts_with('_')
}

fn read_intent(reader: &mut DataReader<'_>) -> Option<StepDraft> {
    reader.reject_unknown(&["prompt", "expand"]);
    let expand = reader.boolean("expand", false);
    let prompt = match reader.string("prompt") {
        Some(prompt) if !prompt.trim().is_empty() => prompt,
        Some(_) => {
            reader.invalid(
                "prompt",
                format!("intent '{}' has an empty prompt", reader.id),
            );
            return None;
        }
        None => {
            if reader.value("prompt").is_none() {
                reader.missing("prompt", format!("intent '{}' needs a prompt", reader.id));
            }
            return None;
        }
    };
    let requirement = expand.then(|| Requirement {
        service: Service::LangFlow,
        capability: PROMPT_EXPANSION_FLOW.to_owned(),
        models: Vec::new(),
        vram_mb: 0,
    });
    Some(StepDraft {
        retry: RetryOverride::default(),
        kind: StepKind::Intent,
        spec: StepSpec::Intent { prompt, expand },
        ports: Vec::new(),
        produces: Some(ArtifactKind::Text),
        requirement,
    })
}

/// `image` and `video`: a template of the matching kind, its parameters set from data.
fn read_templated(
    reader: &mut DataReader<'_>,
    catalog: &Catalog,
    wanted: TemplateKind,
) -> Option<StepDraft> {
    let (kind, default, capability, default_vram) = match wanted {
        TemplateKind::Video => (
            StepKind::Video,
            catalog.default_video_template(),
            "video",
            DEFAULT_VIDEO_VRAM_MB,
        ),
        _ => (
            StepKind::Image,
            catalog.default_image_template(),
            "image",
            DEFAULT_IMAGE_VRAM_MB,
        ),
    };
    let named = reader.string("template");
    let template = find_template(reader, catalog, named.as_deref(), default)?;
    if template.kind != wanted {
        let message = format!(
            "template '{}' is a {:?} template; a {kind} step needs a {:?} one",
            template.name, template.kind, wanted
        );
        reader.invalid("template", message.to_lowercase());
        return None;
    }

    // Every other data key is a template parameter.
    let params: Map<String, Value> = reader
        .data
        .iter()
        .filter(|(key, _)| key.as_str() != "template")
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    let (literals, ports) = read_parameters(reader, template, &params, "");

    let spec = ComfySpec {
        template: Some(template.name.clone()),
        inline: None,
        literals,
        bindings: BTreeMap::new(),
        output: template.output,
    };
    Some(StepDraft {
        retry: RetryOverride::default(),
        kind,
        spec: StepSpec::Comfy(spec),
        ports,
        produces: Some(template.output),
        requirement: Some(Requirement {
            service: Service::ComfyUi,
            capability: capability.to_owned(),
            models: template.models.clone(),
            vram_mb: template.vram_mb.unwrap_or(default_vram),
        }),
    })
}

fn find_template<'c>(
    reader: &mut DataReader<'_>,
    catalog: &'c Catalog,
    named: Option<&str>,
    default: &str,
) -> Option<&'c Template> {
    let name = named.unwrap_or(default);
    if let Some(template) = catalog.templates().get(name) {
        return Some(template);
    }
    let known: Vec<&str> = catalog
        .templates()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    let message = match named {
        Some(_) => format!(
            "step '{}' names unknown template '{name}' (known: {known})",
            reader.id
        ),
        None => format!(
            "step '{}' uses the cluster's default template '{name}', which is not loaded \
             (known: {known})",
            reader.id
        ),
    };
    reader.issues.node(
        codes::UNKNOWN_TEMPLATE,
        reader.id,
        Some("data.template"),
        message,
    );
    None
}

/// Checks literal parameter values against a template and derives the ports of its
/// upstream-fed parameters. `prefix` is where the values sit in data (`""` for image and
/// video, `"parameters."` for comfyui).
fn read_parameters(
    reader: &mut DataReader<'_>,
    template: &Template,
    values: &Map<String, Value>,
    prefix: &str,
) -> (BTreeMap<String, Value>, Vec<Port>) {
    let mut literals = BTreeMap::new();
    for (key, value) in values {
        if value.is_null() || (prefix.is_empty() && is_display_key(key)) {
            continue;
        }
        let field = format!("{prefix}{key}");
        let Some(spec) = template.parameters.get(key) else {
            let known: Vec<&str> = template.parameters.keys().map(String::as_str).collect();
            let message = format!(
                "step '{}': template '{}' has no parameter {key:?} (it has: {})",
                reader.id,
                template.name,
                known.join(", ")
            );
            let field = format!("data.{field}");
            reader
                .issues
                .node(codes::UNKNOWN_PARAMETER, reader.id, Some(&field), message);
            continue;
        };
        match spec.check(value) {
            Ok(value) => {
                literals.insert(key.clone(), value);
            }
            Err(reason) => reader.invalid(&field, format!("step '{}' {key} {reason}", reader.id)),
        }
    }

    let mut ports = Vec::new();
    for (name, spec) in &template.parameters {
        let given = literals.contains_key(name) || values.get(name).is_some_and(|v| !v.is_null());
        match spec.upstream_kind() {
            Some(kind) => {
                let mut port = Port::new(name, &[kind], spec.required && !given, Some(1));
                port.field = format!("data.{prefix}{name}");
                ports.push(port);
            }
            None if spec.required && !given => {
                let field = format!("{prefix}{name}");
                let message = format!(
                    "step '{}' needs {name} (template '{}')",
                    reader.id, template.name
                );
                reader.missing(&field, message);
            }
            None => {}
        }
    }
    (literals, ports)
}

fn read_narration(reader: &mut DataReader<'_>) -> Option<StepDraft> {
    reader.reject_unknown(&["mode", "flow", "prompt"]);
    let prompt = reader.string("prompt");
    let flow = reader.string("flow");
    let mode = match reader.string("mode").as_deref() {
        Some("text") => NarrationMode::Text,
        Some("visual") => NarrationMode::Visual,
        Some(other) => {
            let message = format!(
                "narration '{}' mode must be text or visual, got {other:?}",
                reader.id
            );
            reader.invalid("mode", message);
            return None;
        }
        None => {
            if reader.value("mode").is_none() {
                let message = format!("narration '{}' needs a mode: text or visual", reader.id);
                reader.missing("mode", message);
            }
            return None;
        }
    };
    let (default_flow, ports) = match mode {
        NarrationMode::Text => (
            "narration-text",
            vec![Port::new("text", &[ArtifactKind::Text], true, Some(1))],
        ),
        NarrationMode::Visual => (
            "narration-visual",
            vec![
                Port::new(
                    "media",
                    &[ArtifactKind::Image, ArtifactKind::Video],
                    true,
                    Some(1),
                ),
                Port::new("text", &[ArtifactKind::Text], false, Some(1)),
            ],
        ),
    };
    let flow = flow.unwrap_or_else(|| default_flow.to_owned());
    Some(StepDraft {
        retry: RetryOverride::default(),
        kind: StepKind::Narration,
        requirement: Some(langflow_requirement(&flow)),
        spec: StepSpec::Narration { mode, flow, prompt },
        ports,
        produces: Some(ArtifactKind::Text),
    })
}

fn langflow_requirement(flow: &str) -> Requirement {
    Requirement {
        service: Service::LangFlow,
        capability: flow.to_owned(),
        models: Vec::new(),
        vram_mb: 0,
    }
}

fn read_langflow(reader: &mut DataReader<'_>) -> Option<StepDraft> {
    reader.reject_unknown(&["flow", "input", "input_type", "output_type", "tweaks"]);
    let input = reader.string("input");
    let input_type = reader.choice("input_type", LANGFLOW_IO_TYPES, "chat");
    let output_type = reader.choice("output_type", LANGFLOW_IO_TYPES, "chat");
    let tweaks = match reader.value("tweaks") {
        None => Map::new(),
        Some(Value::Object(tweaks)) => {
            for (component, fields) in tweaks {
                if !fields.is_object() {
                    let message = format!(
                        "langflow '{}' tweak for component {component:?} must be an object of \
                         field values, got {}",
                        reader.id,
                        describe(fields)
                    );
                    reader.invalid(&format!("tweaks.{component}"), message);
                }
            }
            tweaks.clone()
        }
        Some(other) => {
            let message = format!(
                "langflow '{}' tweaks must be an object {{component_id: {{field: value}}}}, got {}",
                reader.id,
                describe(other)
            );
            reader.invalid("tweaks", message);
            Map::new()
        }
    };
    let flow = match reader.string("flow") {
        Some(flow) if !flow.trim().is_empty() => flow,
        Some(_) | None => {
            if reader.value("flow").is_none_or(|v| v.as_str().is_some()) {
                let message = format!("langflow '{}' needs a flow alias", reader.id);
                reader.missing("flow", message);
            }
            return None;
        }
    };
    Some(StepDraft {
        retry: RetryOverride::default(),
        kind: StepKind::LangFlow,
        requirement: Some(langflow_requirement(&flow)),
        spec: StepSpec::Langflow {
            flow,
            input,
            input_type,
            output_type,
            tweaks,
        },
        ports: vec![
            Port::new("input", &[ArtifactKind::Text], false, Some(1)),
            Port::new(
                "files",
                &[ArtifactKind::Image, ArtifactKind::Video],
                false,
                None,
            ),
        ],
        produces: Some(ArtifactKind::Text),
    })
}

fn read_comfyui(reader: &mut DataReader<'_>, catalog: &Catalog) -> Option<StepDraft> {
    reader.reject_unknown(&["workflow", "template", "parameters", "bindings", "output"]);
    let output = match reader.string("output") {
        None => None,
        Some(kind) => match parse_kind(&kind) {
            Some(kind) => Some(kind),
            None => {
                let message = format!(
                    "comfyui '{}' output must be text, image, video or data, got {kind:?}",
                    reader.id
                );
                reader.invalid("output", message);
                None
            }
        },
    };
    let bindings = read_bindings(reader);
    let template_name = reader.string("template");
    let workflow = reader.value("workflow").cloned();

    let (graph, template) = match (workflow, template_name) {
        (Some(_), Some(_)) => {
            let message = format!(
                "comfyui '{}' gives both workflow and template; keep one",
                reader.id
            );
            reader.invalid("workflow", message);
            return None;
        }
        (None, None) => {
            if reader.value("template").is_none() {
                let message = format!(
                    "comfyui '{}' needs a workflow (inline API-format graph) or a template name",
                    reader.id
                );
                reader.missing("workflow", message);
            }
            return None;
        }
        (Some(workflow), None) => {
            let problems = comfy_graph::check_api_format(&workflow);
            if !problems.is_empty() {
                for problem in problems {
                    let message = format!("comfyui '{}' workflow: {problem}", reader.id);
                    let field = Some("data.workflow");
                    reader
                        .issues
                        .node(codes::INVALID_WORKFLOW, reader.id, field, message);
                }
                return None;
            }
            if reader.value("parameters").is_some() {
                let message = format!(
                    "comfyui '{}' parameters apply to templates; write literal values into the \
                     inline workflow instead",
                    reader.id
                );
                reader.invalid("parameters", message);
            }
            (workflow, None)
        }
        (None, Some(name)) => {
            let template = find_template(reader, catalog, Some(&name), &name)?;
            (template.prompt.clone(), Some(template))
        }
    };

    // Placeholders and bindings must match one to one.
    let used = comfy_graph::placeholders(&graph);
    for placeholder in &used {
        if !bindings.contains_key(placeholder) {
            let message = format!(
                "comfyui '{}' workflow uses {placeholder} but data.bindings does not bind it",
                reader.id
            );
            reader.missing(&format!("bindings.{placeholder}"), message);
        }
    }
    let mut ports = Vec::new();
    for (placeholder, binding) in &bindings {
        if !used.contains(placeholder) {
            let message = format!(
                "comfyui '{}' binds {placeholder}, but no node input of the workflow is \
                 exactly \"{placeholder}\"",
                reader.id
            );
            reader.invalid(&format!("bindings.{placeholder}"), message);
            continue;
        }
        let accepts = binding
            .kind
            .map(|kind| vec![kind])
            .unwrap_or(ALL_KINDS.to_vec());
        ports.push(Port {
            name: placeholder.clone(),
            accepts,
            required: true,
            max: Some(1),
            pinned: binding.from.clone(),
            field: format!("data.bindings.{placeholder}"),
        });
    }

    let mut literals = BTreeMap::new();
    if let Some(template) = template {
        let values = match reader.value("parameters") {
            None => Map::new(),
            Some(Value::Object(values)) => values.clone(),
            Some(other) => {
                let message = format!(
                    "comfyui '{}' parameters must be an object, got {}",
                    reader.id,
                    describe(other)
                );
                reader.invalid("parameters", message);
                Map::new()
            }
        };
        let (checked, template_ports) = read_parameters(reader, template, &values, "parameters.");
        literals = checked;
        ports.extend(template_ports);
    }

    let models = match template {
        Some(template) => template.models.clone(),
        None => model_files(&graph),
    };
    let vram_mb = template
        .and_then(|t| t.vram_mb)
        .unwrap_or(if models.is_empty() {
            DEFAULT_MODELLESS_VRAM_MB
        } else {
            DEFAULT_GENERIC_VRAM_MB
        });
    let output = output
        .or(template.map(|t| t.output))
        .unwrap_or_else(|| comfy_graph::infer_output_kind(&graph));
    let spec = ComfySpec {
        template: template.map(|t| t.name.clone()),
        inline: template.is_none().then_some(graph),
        literals,
        bindings,
        output,
    };
    Some(StepDraft {
        retry: RetryOverride::default(),
        kind: StepKind::ComfyUi,
        spec: StepSpec::Comfy(spec),
        ports,
        produces: Some(output),
        requirement: Some(Requirement {
            service: Service::ComfyUi,
            capability: GENERIC_COMFY.to_owned(),
            models,
            vram_mb,
        }),
    })
}

fn read_bindings(reader: &mut DataReader<'_>) -> BTreeMap<String, Binding> {
    let mut bindings = BTreeMap::new();
    let entries = match reader.value("bindings") {
        None => return bindings,
        Some(Value::Object(entries)) => entries.clone(),
        Some(other) => {
            let message = format!(
                "comfyui '{}' bindings must be an object {{\"$name\": {{from, kind}}}}, got {}",
                reader.id,
                describe(other)
            );
            reader.invalid("bindings", message);
            return bindings;
        }
    };
    for (placeholder, entry) in entries {
        let field = format!("bindings.{placeholder}");
        if !comfy_graph::is_placeholder(&placeholder) {
            let message = format!(
                "comfyui '{}' binding name {placeholder:?} must be $ followed by a name, \
                 like \"$input\"",
                reader.id
            );
            reader.invalid(&field, message);
            continue;
        }
        let Some(entry) = entry.as_object() else {
            let message = format!(
                "comfyui '{}' binding {placeholder} must be an object {{from, kind}}, got {}",
                reader.id,
                describe(&entry)
            );
            reader.invalid(&field, message);
            continue;
        };
        let from = match entry.get("from") {
            None | Some(Value::Null) => None,
            Some(Value::String(from)) if !from.is_empty() => Some(from.clone()),
            Some(other) => {
                let message = format!(
                    "comfyui '{}' binding {placeholder} from must be a step id, got {}",
                    reader.id,
                    describe(other)
                );
                reader.invalid(&format!("{field}.from"), message);
                continue;
            }
        };
        let kind = match entry.get("kind") {
            None | Some(Value::Null) => None,
            Some(Value::String(kind)) if parse_kind(kind).is_some() => parse_kind(kind),
            Some(other) => {
                let message = format!(
                    "comfyui '{}' binding {placeholder} kind must be text, image, video or data, \
                     got {}",
                    reader.id,
                    describe(other)
                );
                reader.invalid(&format!("{field}.kind"), message);
                continue;
            }
        };
        for key in entry
            .keys()
            .filter(|key| !matches!(key.as_str(), "from" | "kind"))
        {
            let message = format!(
                "comfyui '{}' binding {placeholder} has no field {key:?}",
                reader.id
            );
            let field = format!("data.{field}.{key}");
            reader
                .issues
                .node(codes::UNKNOWN_PARAMETER, reader.id, Some(&field), message);
        }
        bindings.insert(placeholder, Binding { from, kind });
    }
    bindings
}

pub(crate) fn parse_kind(name: &str) -> Option<ArtifactKind> {
    ALL_KINDS.into_iter().find(|kind| kind.as_str() == name)
}

/// Model files an inline graph's loaders name, for placement.
fn model_files(graph: &Value) -> Vec<String> {
    let mut models: Vec<String> = graph
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, node)| node.get("inputs").and_then(Value::as_object))
        .flatten()
        .filter_map(|(_, value)| value.as_str())
        .filter(|value| {
            let lower = value.to_ascii_lowercase();
            MODEL_EXTENSIONS.iter().any(|ext| lower.ends_with(ext))
        })
        .map(str::to_owned)
        .collect();
    models.sort();
    models.dedup();
    models
}
