//! ComfyUI templates: an API-format graph plus the parameters a step may set in it.
//!
//! A template is how a step type like `image` stays independent of the graph that implements
//! it. The file names each parameter, its type and bounds, and where it lands in the graph
//! (node id + input name, possibly several places: Flux needs the width in the latent and in
//! the model sampling node). Steps then set `width: 1024` without knowing the graph, and a
//! studio can swap in its own graph by dropping a file in the templates directory.
//!
//! Templates are checked when loaded, so a broken file stops the daemon at start with the
//! file's name rather than failing a run hours later.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::comfy_graph;
use crate::artifact::ArtifactKind;

/// Why templates could not be loaded. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template directory {dir}: {source}")]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read template file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("template file {file} cannot be parsed: {source}")]
    Parse {
        file: String,
        source: serde_json::Error,
    },
    #[error("template file {file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("template {name:?} is defined twice, in {first} and in {second}")]
    Duplicate {
        name: String,
        first: String,
        second: String,
    },
}

/// What a template is for, which decides which step types may use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateKind {
    /// Text to image; usable by `image` steps.
    Image,
    /// Image to video; usable by `video` steps.
    Video,
    /// Anything else; usable by `comfyui` steps only (they may use any template).
    Generic,
}

/// The type of a template parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamType {
    String,
    Integer,
    Number,
    Boolean,
    /// A file from an upstream image artifact, uploaded to the node before the prompt.
    Image,
    /// A file from an upstream video artifact, uploaded to the node before the prompt.
    Video,
}

impl ParamType {
    /// The artifact kind an upstream step must produce to fill this parameter, for file types.
    pub fn file_kind(self) -> Option<ArtifactKind> {
        match self {
            ParamType::Image => Some(ArtifactKind::Image),
            ParamType::Video => Some(ArtifactKind::Video),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Integer => "integer",
            ParamType::Number => "number",
            ParamType::Boolean => "boolean",
            ParamType::Image => "image",
            ParamType::Video => "video",
        }
    }
}

/// Where else a parameter's value may come from than the step's own `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamSource {
    /// A string parameter that takes the text of an upstream text artifact (an intent's
    /// prompt) when the step's data does not set it.
    UpstreamText,
}

/// One place in the graph a parameter is written to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub node: String,
    pub input: String,
}

/// A parameter a template exposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamSpec {
    #[serde(rename = "type")]
    pub ty: ParamType,
    /// Where the value is written; never empty after loading.
    pub targets: Vec<Target>,
    /// Written when the step gives no value; without one the graph's own value stays.
    pub default: Option<Value>,
    /// The step must provide a value (in data, or upstream for file and upstream-text
    /// parameters). File parameters are required unless the file says otherwise.
    pub required: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// For integers: the value must be a multiple of this (e.g. 16 for latent sizes).
    pub multiple_of: Option<u64>,
    /// For strings: the accepted values, when the input is a ComfyUI combo.
    pub choices: Vec<String>,
    pub source: Option<ParamSource>,
    pub description: Option<String>,
}

impl ParamSpec {
    /// Checks a literal value from a step's data and returns it as it will be injected, or a
    /// sentence (without the parameter's name) saying what was expected.
    pub fn check(&self, value: &Value) -> Result<Value, String> {
        let got = super::issue::describe(value);
        match self.ty {
            ParamType::String => {
                let Some(text) = value.as_str() else {
                    return Err(format!("must be a string, got {got}"));
                };
                if !self.choices.is_empty() && !self.choices.iter().any(|c| c == text) {
                    return Err(format!(
                        "must be one of {}, got {got}",
                        self.choices.join(", ")
                    ));
                }
            }
            ParamType::Integer => {
                let Some(int) = value
                    .as_i64()
                    .map(i128::from)
                    .or(value.as_u64().map(i128::from))
                else {
                    return Err(format!(
                        "must be an integer{}, got {got}",
                        self.range_text()
                    ));
                };
                // Bounds are f64 in the file; integers up to 2^53 compare exactly, and a
                // seed near u64::MAX is only compared against u64::MAX itself.
                if self.min.is_some_and(|min| (int as f64) < min)
                    || self.max.is_some_and(|max| (int as f64) > max)
                {
                    return Err(format!(
                        "must be an integer{}, got {int}",
                        self.range_text()
                    ));
                }
                if let Some(step) = self.multiple_of.filter(|step| *step > 1) {
                    if int % i128::from(step) != 0 {
                        return Err(format!(
                            "must be a multiple of {step}{}, got {int}",
                            self.range_text()
                        ));
                    }
                }
            }
            ParamType::Number => {
                let Some(number) = value.as_f64() else {
                    return Err(format!("must be a number{}, got {got}", self.range_text()));
                };
                if self.min.is_some_and(|min| number < min)
                    || self.max.is_some_and(|max| number > max)
                {
                    return Err(format!(
                        "must be a number{}, got {number}",
                        self.range_text()
                    ));
                }
            }
            ParamType::Boolean => {
                if !value.is_boolean() {
                    return Err(format!("must be true or false, got {got}"));
                }
            }
            ParamType::Image | ParamType::Video => {
                return Err(format!(
                    "is a {} file and comes from an upstream step through an edge, not from data",
                    self.ty.as_str()
                ));
            }
        }
        Ok(value.clone())
    }

    /// Whether the value can come from an upstream artifact, and of which kind.
    pub fn upstream_kind(&self) -> Option<ArtifactKind> {
        match (self.ty.file_kind(), self.source) {
            (Some(kind), _) => Some(kind),
            (None, Some(ParamSource::UpstreamText)) => Some(ArtifactKind::Text),
            (None, None) => None,
        }
    }

    fn range_text(&self) -> String {
        let shown = |bound: f64| self.bound_text(bound);
        match (self.min, self.max) {
            (Some(min), Some(max)) => format!(" between {} and {}", shown(min), shown(max)),
            (Some(min), None) => format!(" of at least {}", shown(min)),
            (None, Some(max)) => format!(" of at most {}", shown(max)),
            (None, None) => String::new(),
        }
    }

    /// A bound as a person would write it: an integer parameter's bound of `u64::MAX as f64`
    /// reads 18446744073709551615, not the float's 18446744073709552000.
    fn bound_text(&self, bound: f64) -> String {
        let integer = matches!(self.ty, ParamType::Integer) && bound.fract() == 0.0;
        if integer && bound >= u64::MAX as f64 {
            u64::MAX.to_string()
        } else if integer && bound.abs() < 9.0e15 {
            (bound as i64).to_string()
        } else {
            bound.to_string()
        }
    }
}

/// A loaded, checked template.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub name: String,
    pub kind: TemplateKind,
    pub description: String,
    /// What the graph's outputs are.
    pub output: ArtifactKind,
    /// Model files the graph loads, for placement.
    pub models: Vec<String>,
    /// VRAM estimate in MiB; `None` lets the step type's default apply.
    pub vram_mb: Option<u64>,
    pub parameters: BTreeMap<String, ParamSpec>,
    /// The API-format graph.
    pub prompt: Value,
    /// The file the template came from, for messages.
    pub file: String,
}

/// The file format, before checking.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TemplateFile {
    name: Option<String>,
    kind: TemplateKind,
    #[serde(default)]
    description: String,
    #[serde(default)]
    output: Option<ArtifactKind>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    vram_mb: Option<u64>,
    #[serde(default)]
    parameters: BTreeMap<String, ParamFile>,
    prompt: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamFile {
    #[serde(rename = "type")]
    ty: ParamType,
    node: Option<String>,
    input: Option<String>,
    #[serde(default)]
    targets: Vec<Target>,
    default: Option<Value>,
    required: Option<bool>,
    min: Option<f64>,
    max: Option<f64>,
    multiple_of: Option<u64>,
    #[serde(default)]
    choices: Vec<String>,
    source: Option<ParamSource>,
    description: Option<String>,
}

impl Template {
    /// Parses and checks one template file. `file` names it in errors; the template's name is
    /// its `name` field, else the file name without `.json`.
    pub fn parse(file: &str, contents: &str) -> Result<Template, TemplateError> {
        let raw: TemplateFile =
            serde_json::from_str(contents).map_err(|source| TemplateError::Parse {
                file: file.to_owned(),
                source,
            })?;
        let invalid = |reason: String| TemplateError::Invalid {
            file: file.to_owned(),
            reason,
        };

        let problems = comfy_graph::check_api_format(&raw.prompt);
        if !problems.is_empty() {
            return Err(invalid(format!("prompt: {}", problems.join("; "))));
        }

        let name = match raw.name {
            Some(name) if !name.trim().is_empty() => name,
            Some(_) => return Err(invalid("name must not be empty".to_owned())),
            None => stem(file).to_owned(),
        };

        let mut parameters = BTreeMap::new();
        for (key, param) in raw.parameters {
            let spec = check_param(&key, param, &raw.prompt).map_err(invalid)?;
            parameters.insert(key, spec);
        }

        let output = raw.output.unwrap_or(match raw.kind {
            TemplateKind::Image => ArtifactKind::Image,
            TemplateKind::Video => ArtifactKind::Video,
            TemplateKind::Generic => comfy_graph::infer_output_kind(&raw.prompt),
        });

        Ok(Template {
            name,
            kind: raw.kind,
            description: raw.description,
            output,
            models: raw.models,
            vram_mb: raw.vram_mb,
            parameters,
            prompt: raw.prompt,
            file: file.to_owned(),
        })
    }
}

fn check_param(key: &str, raw: ParamFile, prompt: &Value) -> Result<ParamSpec, String> {
    let mut targets = raw.targets;
    match (raw.node, raw.input) {
        (Some(node), Some(input)) => targets.insert(0, Target { node, input }),
        (None, None) => {}
        _ => {
            return Err(format!(
                "parameter {key:?}: give both \"node\" and \"input\""
            ))
        }
    }
    if targets.is_empty() {
        return Err(format!("parameter {key:?} has no node/input to write to"));
    }
    for target in &targets {
        if !comfy_graph::has_input(prompt, &target.node, &target.input) {
            return Err(format!(
                "parameter {key:?} targets input {:?} of node {:?}, which the prompt lacks",
                target.input, target.node
            ));
        }
    }
    if raw.source.is_some() && raw.ty != ParamType::String {
        return Err(format!(
            "parameter {key:?}: only string parameters take upstream text"
        ));
    }
    if !raw.choices.is_empty() && raw.ty != ParamType::String {
        return Err(format!(
            "parameter {key:?}: only string parameters have choices"
        ));
    }

    let spec = ParamSpec {
        ty: raw.ty,
        targets,
        default: None,
        required: raw.required.unwrap_or(raw.ty.file_kind().is_some()),
        min: raw.min,
        max: raw.max,
        multiple_of: raw.multiple_of,
        choices: raw.choices,
        source: raw.source,
        description: raw.description,
    };
    let default = match raw.default {
        None => None,
        Some(value) => match spec.check(&value) {
            Ok(value) => Some(value),
            Err(reason) => return Err(format!("parameter {key:?} default {reason}")),
        },
    };
    Ok(ParamSpec { default, ..spec })
}

fn stem(file: &str) -> &str {
    let base = file.rsplit(['/', '\\']).next().unwrap_or(file);
    base.strip_suffix(".json").unwrap_or(base)
}

/// Templates by name.
#[derive(Debug, Clone, Default)]
pub struct TemplateLibrary {
    templates: BTreeMap<String, Template>,
}

/// The templates shipped in `config/templates`, compiled in so the daemon and tests work
/// without the directory.
const BUILTIN: &[(&str, &str)] = &[
    (
        "flux-txt2img.json",
        include_str!("../../../config/templates/flux-txt2img.json"),
    ),
    (
        "wan21-i2v.json",
        include_str!("../../../config/templates/wan21-i2v.json"),
    ),
    (
        "invert-image.json",
        include_str!("../../../config/templates/invert-image.json"),
    ),
];

impl TemplateLibrary {
    /// Parses every `*.json` file of a directory, in file name order; the error names the
    /// file. Other files are ignored.
    pub fn load_dir(dir: &Path) -> Result<TemplateLibrary, TemplateError> {
        let read_dir = |source| TemplateError::ReadDir {
            dir: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            if path.extension().is_some_and(|ext| ext == "json") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();

        let mut sources = Vec::with_capacity(files.len());
        for file in files {
            let contents =
                std::fs::read_to_string(&file).map_err(|source| TemplateError::Read {
                    file: file.clone(),
                    source,
                })?;
            sources.push((file.display().to_string(), contents));
        }
        TemplateLibrary::from_sources(sources.iter().map(|(f, c)| (f.as_str(), c.as_str())))
    }

    /// Parses (file name, contents) pairs, for templates embedded in the binary. Two files
    /// defining the same name are an error: one of them would be silently ignored.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<TemplateLibrary, TemplateError> {
        let mut templates: BTreeMap<String, Template> = BTreeMap::new();
        for (file, contents) in sources {
            let template = Template::parse(file, contents)?;
            if let Some(first) = templates.get(&template.name) {
                return Err(TemplateError::Duplicate {
                    name: template.name.clone(),
                    first: first.file.clone(),
                    second: template.file,
                });
            }
            templates.insert(template.name.clone(), template);
        }
        Ok(TemplateLibrary { templates })
    }

    /// The templates of `config/templates` as compiled into the binary.
    pub fn builtin() -> Result<TemplateLibrary, TemplateError> {
        TemplateLibrary::from_sources(BUILTIN.iter().copied())
    }

    /// Adds `other`'s templates; on a name both have, `other`'s wins (a directory overrides
    /// the built-ins).
    pub fn merge(&mut self, other: TemplateLibrary) {
        self.templates.extend(other.templates);
    }

    pub fn get(&self, name: &str) -> Option<&Template> {
        self.templates.get(name)
    }

    /// All templates, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Template> {
        self.templates.values()
    }

    pub fn len(&self) -> usize {
        self.templates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.templates.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn builtin_templates_load() {
        let library = TemplateLibrary::builtin().unwrap();
        let flux = library.get("flux-txt2img").unwrap();
        assert_eq!(flux.kind, TemplateKind::Image);
        assert_eq!(flux.output, ArtifactKind::Image);
        for name in ["prompt", "seed", "width", "height", "steps", "guidance"] {
            assert!(flux.parameters.contains_key(name), "flux lacks {name}");
        }
        let wan = library.get("wan21-i2v").unwrap();
        assert_eq!(wan.output, ArtifactKind::Video);
        for name in [
            "prompt", "negative", "image", "frames", "fps", "seed", "steps", "width",
        ] {
            assert!(wan.parameters.contains_key(name), "wan lacks {name}");
        }
        assert_eq!(
            wan.parameters["image"].upstream_kind(),
            Some(ArtifactKind::Image)
        );
        let invert = library.get("invert-image").unwrap();
        assert_eq!(invert.kind, TemplateKind::Generic);
        assert!(invert.models.is_empty());
        assert_eq!(invert.output, ArtifactKind::Image);
    }

    #[test]
    fn load_dir_reads_json_files_sorted_and_names_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = json!({
            "kind": "generic",
            "parameters": {"w": {"type": "integer", "node": "1", "input": "width"}},
            "prompt": {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}
        });
        std::fs::write(dir.path().join("a.json"), good.to_string()).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let library = TemplateLibrary::load_dir(dir.path()).unwrap();
        assert_eq!(
            library.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["a"]
        );

        std::fs::write(dir.path().join("b.json"), "{ nope").unwrap();
        let err = TemplateLibrary::load_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("b.json"), "{err}");

        let missing = TemplateLibrary::load_dir(&dir.path().join("nowhere")).unwrap_err();
        assert!(matches!(missing, TemplateError::ReadDir { .. }));
    }

    #[test]
    fn bad_templates_are_refused_with_reason() {
        let prompt = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}});
        let cases = [
            (
                json!({"kind": "generic", "prompt": {"nodes": [], "links": []}}),
                "UI-format",
            ),
            (
                json!({"kind": "generic", "prompt": prompt,
                       "parameters": {"w": {"type": "integer", "node": "2", "input": "width"}}}),
                "lacks",
            ),
            (
                json!({"kind": "generic", "prompt": prompt,
                       "parameters": {"w": {"type": "integer", "node": "1", "input": "width",
                                            "default": "big"}}}),
                "default must be an integer",
            ),
            (
                json!({"kind": "generic", "prompt": prompt, "extra": 1}),
                "unknown field",
            ),
        ];
        for (file, expected) in cases {
            let err = Template::parse("t.json", &file.to_string()).unwrap_err();
            assert!(err.to_string().contains(expected), "{err} lacks {expected}");
            assert!(err.to_string().contains("t.json"));
        }
    }

    #[test]
    fn duplicate_names_and_merge() {
        let a = r#"{"name": "x", "kind": "generic",
                    "prompt": {"1": {"class_type": "A", "inputs": {}}}}"#;
        let b = r#"{"name": "x", "kind": "image",
                    "prompt": {"1": {"class_type": "B", "inputs": {}}}}"#;
        let err = TemplateLibrary::from_sources([("a.json", a), ("b.json", b)]).unwrap_err();
        assert!(matches!(err, TemplateError::Duplicate { .. }), "{err}");

        let mut library = TemplateLibrary::from_sources([("a.json", a)]).unwrap();
        library.merge(TemplateLibrary::from_sources([("b.json", b)]).unwrap());
        assert_eq!(library.get("x").unwrap().kind, TemplateKind::Image);
    }

    #[test]
    fn parameter_checks() {
        let spec = ParamSpec {
            ty: ParamType::Integer,
            targets: vec![],
            default: None,
            required: false,
            min: Some(64.0),
            max: Some(2048.0),
            multiple_of: Some(8),
            choices: vec![],
            source: None,
            description: None,
        };
        assert!(spec.check(&json!(1024)).is_ok());
        assert!(spec
            .check(&json!(1020))
            .unwrap_err()
            .contains("multiple of 8"));
        assert!(spec
            .check(&json!(4096))
            .unwrap_err()
            .contains("between 64 and 2048"));
        assert!(spec.check(&json!(512.5)).is_err());
        assert!(spec.check(&json!("512")).is_err());
        let seed = ParamSpec {
            min: Some(0.0),
            max: Some(u64::MAX as f64),
            multiple_of: None,
            ..spec
        };
        assert!(seed.check(&json!(u64::MAX)).is_ok());
        assert!(seed.check(&json!(-1)).is_err());
    }
}
