//! Rendering: a planned step plus its upstream artifacts become the concrete job.
//!
//! Rendering happens at run time, when the inputs exist, because that is when the text an
//! intent produced or the file name an upload will need is known. Planning already checked
//! every value, so a render error means the world changed underneath (a template reloaded
//! without a parameter, an upstream step that produced nothing) and names the step and what
//! it lacked.

use std::path::PathBuf;

use serde_json::{Map, Value};

use super::catalog::Catalog;
use super::comfy_graph;
use super::plan::PlannedStep;
use super::step::{ComfySpec, NarrationMode, StepSpec, PROMPT_EXPANSION_FLOW};
use crate::artifact::{ArtifactKind, ArtifactMeta};

/// An upstream artifact handed to a step.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    pub from_step: String,
    pub meta: ArtifactMeta,
    /// Where the content is stored locally.
    pub path: PathBuf,
    /// The content, for text artifacts (small enough to hold; files are never read here).
    pub text: Option<String>,
}

/// What running a step means.
#[derive(Debug, Clone, PartialEq)]
pub enum Job {
    /// Done inside the daemon: the text an intent step produces.
    Text(String),
    /// Done inside the daemon: an output step collects its inputs as the run's deliverables.
    Collect,
    Comfy(ComfyJob),
    Langflow(LangflowJob),
}

/// A prompt for ComfyUI, ready to submit once its uploads are done.
#[derive(Debug, Clone, PartialEq)]
pub struct ComfyJob {
    /// API-format graph with every parameter injected.
    pub prompt: Value,
    /// Files to upload first; the name the server returns goes into `node_id`/`input_name`
    /// (the prompt already holds `filename` there, right when the server keeps the name).
    pub uploads: Vec<UploadSlot>,
    /// What the prompt's outputs are.
    pub output_kind: ArtifactKind,
}

/// A file to upload to ComfyUI's input folder, and where its name goes in the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadSlot {
    pub path: PathBuf,
    /// The name to upload under: the artifact id plus its extension, so the same content is
    /// one file on the node however many runs use it.
    pub filename: String,
    pub node_id: String,
    pub input_name: String,
}

/// A LangFlow run.
#[derive(Debug, Clone, PartialEq)]
pub struct LangflowJob {
    /// Our alias, a key of the node's `langflow.flows`.
    pub flow: String,
    pub input_value: String,
    /// `chat`, `text` or `any`.
    pub input_type: String,
    pub output_type: String,
    /// Component id -> {field: value}.
    pub tweaks: Map<String, Value>,
    /// Files to upload and attach to the flow's file component (visual narration).
    pub files: Vec<PathBuf>,
}

/// Why a step could not be turned into a job. Every variant names the step.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RenderError {
    #[error("step {step}: no artifact arrived for input {input}")]
    MissingInput { step: String, input: String },
    #[error("step {step}: the text artifact from {from} was not loaded")]
    MissingText { step: String, from: String },
    #[error("step {step}: template {template} is no longer loaded")]
    UnknownTemplate { step: String, template: String },
    #[error("step {step}: cannot inject {what}: {reason}")]
    Inject {
        step: String,
        what: String,
        reason: String,
    },
}

/// Instructions a visual narration sends when the step gives none.
const DEFAULT_VISUAL_INSTRUCTIONS: &str =
    "Write a short narration, two or three sentences, for what this shows.";

impl PlannedStep {
    /// Turns the step plus its upstream artifacts into the concrete job. Text from upstream
    /// (e.g. an intent's prompt) flows into prompts; files become uploads.
    pub fn render(&self, inputs: &[InputArtifact], catalog: &Catalog) -> Result<Job, RenderError> {
        let renderer = Renderer { step: self, inputs };
        match &self.spec {
            StepSpec::Intent {
                prompt,
                expand: false,
            } => Ok(Job::Text(prompt.clone())),
            StepSpec::Intent {
                prompt,
                expand: true,
            } => Ok(Job::Langflow(LangflowJob {
                flow: PROMPT_EXPANSION_FLOW.to_owned(),
                input_value: prompt.clone(),
                input_type: "chat".to_owned(),
                output_type: "chat".to_owned(),
                tweaks: Map::new(),
                files: Vec::new(),
            })),
            StepSpec::Output => Ok(Job::Collect),
            StepSpec::Comfy(spec) => renderer.comfy(spec, catalog).map(Job::Comfy),
            StepSpec::Narration { mode, flow, prompt } => renderer
                .narration(*mode, flow, prompt.as_deref())
                .map(Job::Langflow),
            StepSpec::Langflow {
                flow,
                input,
                input_type,
                output_type,
                tweaks,
            } => {
                let input_value = match input {
                    Some(input) => input.clone(),
                    None => renderer.text("input")?.unwrap_or_default(),
                };
                Ok(Job::Langflow(LangflowJob {
                    flow: flow.clone(),
                    input_value,
                    input_type: input_type.clone(),
                    output_type: output_type.clone(),
                    tweaks: tweaks.clone(),
                    files: renderer
                        .artifacts("files")
                        .map(|a| a.path.clone())
                        .collect(),
                }))
            }
        }
    }
}

struct Renderer<'a> {
    step: &'a PlannedStep,
    inputs: &'a [InputArtifact],
}

impl<'a> Renderer<'a> {
    /// The artifacts arriving on input `handle`, in the plan's input order.
    fn artifacts(&self, handle: &'a str) -> impl Iterator<Item = &'a InputArtifact> + 'a {
        let inputs = self.inputs;
        self.step
            .inputs
            .iter()
            .filter(move |input| input.handle.as_deref() == Some(handle))
            .flat_map(move |input| {
                inputs
                    .iter()
                    .filter(move |artifact| artifact.from_step == input.from)
            })
    }

    fn first(&self, handle: &'a str) -> Option<&'a InputArtifact> {
        self.artifacts(handle).next()
    }

    fn require(&self, handle: &'a str) -> Result<&'a InputArtifact, RenderError> {
        self.first(handle).ok_or_else(|| RenderError::MissingInput {
            step: self.step.id.clone(),
            input: handle.to_owned(),
        })
    }

    /// The text on input `handle`, if an artifact arrived there.
    fn text(&self, handle: &'a str) -> Result<Option<String>, RenderError> {
        let Some(artifact) = self.first(handle) else {
            return Ok(None);
        };
        match &artifact.text {
            Some(text) => Ok(Some(text.clone())),
            None => Err(RenderError::MissingText {
                step: self.step.id.clone(),
                from: artifact.from_step.clone(),
            }),
        }
    }

    fn inject(
        &self,
        graph: &mut Value,
        node: &str,
        input: &str,
        value: Value,
    ) -> Result<(), RenderError> {
        comfy_graph::set_input(graph, node, input, value).map_err(|reason| RenderError::Inject {
            step: self.step.id.clone(),
            what: format!("node {node} input {input}"),
            reason,
        })
    }

    /// Writes a value, or queues an upload for a file artifact, at one place of the graph.
    fn place(
        &self,
        graph: &mut Value,
        uploads: &mut Vec<UploadSlot>,
        artifact: &InputArtifact,
        node: &str,
        input: &str,
    ) -> Result<(), RenderError> {
        if artifact.meta.kind == ArtifactKind::Text {
            let text = artifact
                .text
                .clone()
                .ok_or_else(|| RenderError::MissingText {
                    step: self.step.id.clone(),
                    from: artifact.from_step.clone(),
                })?;
            return self.inject(graph, node, input, Value::String(text));
        }
        let filename = upload_name(&artifact.meta);
        self.inject(graph, node, input, Value::String(filename.clone()))?;
        uploads.push(UploadSlot {
            path: artifact.path.clone(),
            filename,
            node_id: node.to_owned(),
            input_name: input.to_owned(),
        });
        Ok(())
    }

    fn comfy(&self, spec: &ComfySpec, catalog: &Catalog) -> Result<ComfyJob, RenderError> {
        let template =
            match &spec.template {
                Some(name) => Some(catalog.templates().get(name).ok_or_else(|| {
                    RenderError::UnknownTemplate {
                        step: self.step.id.clone(),
                        template: name.clone(),
                    }
                })?),
                None => None,
            };
        let mut graph = match (template, &spec.inline) {
            (Some(template), _) => template.prompt.clone(),
            (None, Some(inline)) => inline.clone(),
            (None, None) => Value::Object(Map::new()),
        };
        let mut uploads = Vec::new();

        // Bindings first, located on the pristine graph, so that a parameter value which
        // happens to look like a placeholder is never mistaken for one.
        for placeholder in spec.bindings.keys() {
            let artifact = self.require(placeholder)?;
            for (node, input) in comfy_graph::find_value(&graph, placeholder) {
                self.place(&mut graph, &mut uploads, artifact, &node, &input)?;
            }
        }

        for (name, param) in template.map(|t| &t.parameters).into_iter().flatten() {
            let literal = spec.literals.get(name);
            let upstream = match (literal, param.upstream_kind()) {
                (None, Some(_)) => self.first(name),
                _ => None,
            };
            if let Some(artifact) = upstream {
                for target in &param.targets {
                    self.place(
                        &mut graph,
                        &mut uploads,
                        artifact,
                        &target.node,
                        &target.input,
                    )?;
                }
                continue;
            }
            if let Some(value) = literal.or(param.default.as_ref()) {
                for target in &param.targets {
                    self.inject(&mut graph, &target.node, &target.input, value.clone())?;
                }
            } else if param.required {
                return Err(RenderError::MissingInput {
                    step: self.step.id.clone(),
                    input: name.clone(),
                });
            }
        }

        Ok(ComfyJob {
            prompt: graph,
            uploads,
            output_kind: spec.output,
        })
    }

    fn narration(
        &self,
        mode: NarrationMode,
        flow: &str,
        prompt: Option<&str>,
    ) -> Result<LangflowJob, RenderError> {
        let (input_value, files) = match mode {
            NarrationMode::Text => {
                let text = self
                    .text("text")?
                    .ok_or_else(|| RenderError::MissingInput {
                        step: self.step.id.clone(),
                        input: "text".to_owned(),
                    })?;
                let input = match prompt {
                    Some(prompt) => format!("{prompt}\n\n{text}"),
                    None => text,
                };
                (input, Vec::new())
            }
            NarrationMode::Visual => {
                let media = self.require("media")?;
                let mut input = prompt.unwrap_or(DEFAULT_VISUAL_INSTRUCTIONS).to_owned();
                if let Some(context) = self.text("text")? {
                    input.push_str("\n\nContext: ");
                    input.push_str(&context);
                }
                (input, vec![media.path.clone()])
            }
        };
        Ok(LangflowJob {
            flow: flow.to_owned(),
            input_value,
            input_type: "chat".to_owned(),
            output_type: "chat".to_owned(),
            tweaks: Map::new(),
            files,
        })
    }
}

/// The file name an artifact is uploaded under: its content id and its extension.
fn upload_name(meta: &ArtifactMeta) -> String {
    let id: String = meta
        .id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    let id = if id.is_empty() {
        "artifact".to_owned()
    } else {
        id
    };
    let ext = meta
        .filename
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .filter(|ext| {
            !ext.is_empty() && ext.len() <= 8 && ext.chars().all(|c| c.is_ascii_alphanumeric())
        });
    let ext = ext.unwrap_or_else(|| {
        match meta.kind {
            ArtifactKind::Image => "png",
            ArtifactKind::Video => "webp",
            ArtifactKind::Text => "txt",
            ArtifactKind::Data => "bin",
        }
        .to_owned()
    });
    format!("{id}.{ext}")
}
