//! Parsing `POST /prompt` bodies and validating them the way ComfyUI's
//! `validate_prompt` does, down to its error shapes and quirks.

use std::{collections::HashMap, fmt};

use serde::{
    de::{MapAccess, Visitor},
    Deserialize, Deserializer, Serialize, Serializer,
};
use serde_json::{json, Map, Value};

use super::registry::{ClassDef, ComboSource};

/// The API-format graph, keeping the node order the client sent (the
/// history and queue echo it, and execution follows it).
#[derive(Clone, Debug, Default)]
pub(crate) struct Graph(pub Vec<(String, Value)>);

impl Graph {
    pub fn node(&self, id: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == id).map(|(_, v)| v)
    }

    pub fn class_type(&self, id: &str) -> Option<&str> {
        self.node(id)?.get("class_type")?.as_str()
    }

    pub fn inputs(&self, id: &str) -> Option<&Map<String, Value>> {
        self.node(id)?.get("inputs")?.as_object()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

impl<'de> Deserialize<'de> for Graph {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Ordered;
        impl<'de> Visitor<'de> for Ordered {
            type Value = Graph;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of node ids to nodes")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Graph, A::Error> {
                let mut nodes = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, Value>()? {
                    nodes.push((key, value));
                }
                Ok(Graph(nodes))
            }
        }
        deserializer.deserialize_map(Ordered)
    }
}

impl Serialize for Graph {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// The fields of `POST /prompt` the simulator reads.
#[derive(Debug, Deserialize)]
pub(crate) struct PromptRequest {
    pub prompt: Option<Graph>,
    pub client_id: Option<String>,
    pub prompt_id: Option<String>,
    pub extra_data: Option<Map<String, Value>>,
}

/// A 400 answer: `{error, node_errors}`.
#[derive(Debug)]
pub(crate) struct Rejection(pub Value);

impl Rejection {
    fn new(kind: &str, message: &str, details: &str, node_errors: Value) -> Rejection {
        Rejection(json!({
            "error": {"type": kind, "message": message, "details": details, "extra_info": {}},
            "node_errors": node_errors,
        }))
    }

    pub fn no_prompt() -> Rejection {
        Rejection::new(
            "no_prompt",
            "No prompt provided",
            "No prompt provided",
            json!({}),
        )
    }

    pub fn invalid(message: &str, details: &str) -> Rejection {
        Rejection::new("invalid_prompt", message, details, json!({}))
    }
}

/// An accepted graph: the outputs to run, plus errors of dropped outputs.
#[derive(Debug)]
pub(crate) struct Accepted {
    pub outputs: Vec<String>,
    pub node_errors: Value,
}

/// Context validation reads: classes, model lists, uploaded inputs.
pub(crate) struct Checker<'a> {
    pub classes: &'a HashMap<&'static str, ClassDef>,
    pub combos: &'a ComboSource<'a>,
    /// Whether an annotated input file name (`name [input]`) exists.
    pub input_exists: &'a dyn Fn(&str) -> bool,
}

/// Raised when a link points at a node that is not in the graph; ComfyUI
/// lets this KeyError escape to the caller's frame, which files it.
struct MissingNode(String);

type Verdicts = HashMap<String, (bool, Vec<Value>)>;

impl Checker<'_> {
    /// Validates `graph` like ComfyUI: structural errors first, then each
    /// output node and its ancestors.
    pub fn validate(&self, graph: &Graph) -> Result<Accepted, Rejection> {
        let mut outputs = Vec::new();
        for id in graph.ids() {
            let Some(class_type) = graph.class_type(id) else {
                let message = "Cannot execute because a node is missing the class_type property.";
                return Err(Rejection::invalid(message, &format!("Node ID '#{id}'")));
            };
            let Some(class) = self.classes.get(class_type) else {
                let message = format!("Cannot execute because node {class_type} does not exist.");
                return Err(Rejection::invalid(&message, &format!("Node ID '#{id}'")));
            };
            if class.output_node {
                outputs.push(id.to_owned());
            }
        }
        if outputs.is_empty() {
            let error = Rejection::new("prompt_no_outputs", "Prompt has no outputs", "", json!({}));
            return Err(error);
        }
        self.validate_outputs(graph, outputs)
    }

    fn validate_outputs(&self, graph: &Graph, outputs: Vec<String>) -> Result<Accepted, Rejection> {
        let mut verdicts = Verdicts::new();
        let mut good = Vec::new();
        let mut node_errors = Map::new();
        for output in outputs {
            let valid = match self.validate_node(graph, &output, &mut verdicts) {
                Ok(valid) => valid,
                Err(MissingNode(missing)) => {
                    verdicts.insert(output.clone(), (false, vec![outer_error(&missing)]));
                    false
                }
            };
            if valid {
                good.push(output);
                continue;
            }
            // ComfyUI appends this output to every failed node seen so far.
            for (id, (ok, reasons)) in &verdicts {
                if *ok || reasons.is_empty() {
                    continue;
                }
                let entry = node_errors.entry(id.clone()).or_insert_with(|| {
                    json!({"errors": reasons, "dependent_outputs": [],
                        "class_type": graph.class_type(id)})
                });
                if let Some(list) = entry["dependent_outputs"].as_array_mut() {
                    list.push(json!(output));
                }
            }
        }
        if good.is_empty() {
            let message = "Prompt outputs failed validation";
            let kind = "prompt_outputs_failed_validation";
            return Err(Rejection::new(
                kind,
                message,
                "",
                Value::Object(node_errors),
            ));
        }
        Ok(Accepted {
            outputs: good,
            node_errors: Value::Object(node_errors),
        })
    }

    fn validate_node(
        &self,
        graph: &Graph,
        id: &str,
        verdicts: &mut Verdicts,
    ) -> Result<bool, MissingNode> {
        if let Some((valid, _)) = verdicts.get(id) {
            return Ok(*valid);
        }
        let Some(class) = graph.class_type(id).and_then(|c| self.classes.get(c)) else {
            return Err(MissingNode(id.to_owned()));
        };
        let empty = Map::new();
        let inputs = graph.inputs(id).unwrap_or(&empty);
        let mut errors = Vec::new();
        let mut valid = true;
        let names = class
            .required
            .iter()
            .chain(&class.optional)
            .map(|(n, _)| *n);
        for name in names.collect::<Vec<_>>() {
            let Some((spec, required)) = class.input(name, self.combos) else {
                continue;
            };
            let Some(value) = inputs.get(name) else {
                if required {
                    errors.push(missing_input(name));
                }
                continue;
            };
            let checked = if value.is_array() {
                self.check_link(graph, name, &spec, value, verdicts)?
            } else {
                self.check_literal(class, name, &spec, value)
            };
            match checked {
                Check::Ok => {}
                Check::Failed => valid = false,
                Check::Error(error) => errors.push(error),
            }
        }
        let ok = valid && errors.is_empty();
        verdicts.insert(id.to_owned(), (ok, errors));
        Ok(ok)
    }

    fn check_link(
        &self,
        graph: &Graph,
        name: &str,
        spec: &Value,
        link: &Value,
        verdicts: &mut Verdicts,
    ) -> Result<Check, MissingNode> {
        let (Some(source), Some(slot)) = (link_source(link), link.get(1).and_then(Value::as_u64))
        else {
            return Ok(Check::Error(error(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                json!({"input_name": name, "input_config": config(spec), "received_value": link}),
            )));
        };
        let Some(class_type) = graph.class_type(&source) else {
            return Err(MissingNode(source));
        };
        let received = self
            .classes
            .get(class_type)
            .and_then(|c| c.output_type(slot as usize))
            .unwrap_or("*");
        let expected = spec.get(0).and_then(Value::as_str).unwrap_or("*");
        if received != expected && expected != "*" && received != "*" {
            let details =
                format!("{name}, received_type({received}) mismatch input_type({expected})");
            return Ok(Check::Error(error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                &details,
                json!({"input_name": name, "input_config": config(spec),
                    "received_type": received, "linked_node": link}),
            )));
        }
        match self.validate_node(graph, &source, verdicts) {
            Ok(true) => Ok(Check::Ok),
            Ok(false) => Ok(Check::Failed),
            Err(MissingNode(missing)) => {
                let inner = inner_error(name, spec, link, &missing);
                verdicts.insert(source, (false, vec![inner]));
                Ok(Check::Failed)
            }
        }
    }

    fn check_literal(&self, class: &ClassDef, name: &str, spec: &Value, value: &Value) -> Check {
        if class.name == "LoadImage" && name == "image" {
            return self.check_input_file(name, value);
        }
        match spec.get(0) {
            Some(Value::String(kind)) if kind == "INT" => check_number(name, spec, value, true),
            Some(Value::String(kind)) if kind == "FLOAT" => check_number(name, spec, value, false),
            Some(Value::Array(choices)) => check_combo(name, spec, choices, value),
            // V3 nodes list combo choices under `options` (execution.py
            // reads them from there when the type is `COMBO`).
            Some(Value::String(kind)) if kind == "COMBO" => {
                let choices = spec[1]["options"].as_array().cloned().unwrap_or_default();
                check_combo(name, spec, &choices, value)
            }
            _ => Check::Ok,
        }
    }

    fn check_input_file(&self, name: &str, value: &Value) -> Check {
        let file = value
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| value.to_string());
        if (self.input_exists)(&file) {
            return Check::Ok;
        }
        Check::Error(error(
            "custom_validation_failed",
            "Custom validation failed for node",
            &format!("{name} - Invalid image file: {file}"),
            json!({"input_name": name}),
        ))
    }
}

enum Check {
    Ok,
    /// An upstream node failed; this node fails without a reason of its own.
    Failed,
    Error(Value),
}

fn link_source(link: &Value) -> Option<String> {
    let items = link.as_array().filter(|a| a.len() == 2)?;
    match &items[0] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// ComfyUI always reports `input_config` as `[type, options]`.
fn config(spec: &Value) -> Value {
    let kind = spec.get(0).cloned().unwrap_or(Value::Null);
    let options = spec.get(1).cloned().unwrap_or_else(|| json!({}));
    json!([kind, options])
}

fn error(kind: &str, message: &str, details: &str, extra: Value) -> Value {
    json!({"type": kind, "message": message, "details": details, "extra_info": extra})
}

fn missing_input(name: &str) -> Value {
    error(
        "required_input_missing",
        "Required input is missing",
        name,
        json!({"input_name": name}),
    )
}

const SOURCE: &str = "/srv/comfyui/execution.py";

fn inner_error(name: &str, spec: &Value, link: &Value, missing: &str) -> Value {
    let key = format!("'{missing}'");
    let traceback = [
        format!(
            "  File \"{SOURCE}\", line 808, in validate_inputs\n    r = await \
             validate_inputs(prompt_id, prompt, o_id, validated)\n"
        ),
        format!(
            "  File \"{SOURCE}\", line 788, in validate_inputs\n    o_class_type = \
             prompt[o_id]['class_type']\n"
        ),
    ];
    error(
        "exception_during_inner_validation",
        "Exception when validating inner node",
        &key,
        json!({"input_name": name, "input_config": config(spec), "exception_message": key,
            "exception_type": "KeyError", "traceback": traceback, "linked_node": link}),
    )
}

fn outer_error(missing: &str) -> Value {
    let traceback = [format!(
        "  File \"{SOURCE}\", line 788, in validate_inputs\n    o_class_type = \
         prompt[o_id]['class_type']\n"
    )];
    error(
        "exception_during_validation",
        "Exception when validating node",
        &format!("'{missing}'"),
        json!({"exception_type": "KeyError", "traceback": traceback}),
    )
}

/// Python's `repr` of a JSON scalar, as ComfyUI's messages print it.
pub(crate) fn py_repr(value: &Value) -> String {
    match value {
        Value::String(s) if s.contains('\'') && !s.contains('"') => format!("\"{s}\""),
        Value::String(s) => format!("'{}'", s.replace('\'', "\\'")),
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

/// Python's `str` of a number: floats always carry a decimal point.
fn py_number(value: f64, integer: bool) -> String {
    if integer {
        format!("{}", value as i64)
    } else if value.fract() == 0.0 && value.abs() < 1e16 {
        format!("{value:.1}")
    } else {
        format!("{value}")
    }
}

/// Converts like Python's `int()` / `float()`; the error is Python's text.
fn convert(value: &Value, integer: bool) -> Result<f64, String> {
    let kind = if integer { "int" } else { "float" };
    match value {
        Value::Number(n) => {
            let v = n.as_f64().unwrap_or_default();
            Ok(if integer { v.trunc() } else { v })
        }
        Value::Bool(b) => Ok(f64::from(u8::from(*b))),
        Value::String(s) => {
            let parsed = if integer {
                s.trim().parse::<i64>().map(|v| v as f64).ok()
            } else {
                s.trim().parse::<f64>().ok()
            };
            parsed.ok_or_else(|| {
                if integer {
                    format!("invalid literal for int() with base 10: {}", py_repr(value))
                } else {
                    format!("could not convert string to float: {}", py_repr(value))
                }
            })
        }
        Value::Null => Err(format!(
            "{kind}() argument must be a string, a bytes-like object or a real number, not \
             'NoneType'"
        )),
        _ => Err(format!(
            "{kind}() argument must be a string, a bytes-like object or a real number, not 'dict'"
        )),
    }
}

fn check_number(name: &str, spec: &Value, value: &Value, integer: bool) -> Check {
    let kind = if integer { "INT" } else { "FLOAT" };
    let number = match convert(value, integer) {
        Ok(number) => number,
        Err(message) => {
            return Check::Error(error(
                "invalid_input_type",
                &format!("Failed to convert an input value to a {kind} value"),
                &format!("{name}, {}, {message}", display(value)),
                json!({"input_name": name, "input_config": config(spec),
                    "received_value": value, "exception_message": message}),
            ))
        }
    };
    let options = spec.get(1);
    let bound = |key: &str| options.and_then(|o| o.get(key)).and_then(Value::as_f64);
    let shown = py_number(number, integer);
    if let Some(min) = bound("min").filter(|min| number < *min) {
        return Check::Error(error(
            "value_smaller_than_min",
            &format!(
                "Value {shown} smaller than min of {}",
                py_number(min, integer)
            ),
            name,
            json!({"input_name": name, "input_config": config(spec), "received_value": value}),
        ));
    }
    if let Some(max) = bound("max").filter(|max| number > *max) {
        return Check::Error(error(
            "value_bigger_than_max",
            &format!(
                "Value {shown} bigger than max of {}",
                py_number(max, integer)
            ),
            name,
            json!({"input_name": name, "input_config": config(spec), "received_value": value}),
        ));
    }
    Check::Ok
}

fn display(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

fn check_combo(name: &str, spec: &Value, choices: &[Value], value: &Value) -> Check {
    // An empty list means "accept anything" (a simulator with no models).
    if choices.is_empty() || choices.contains(value) {
        return Check::Ok;
    }
    let listed: Vec<String> = choices.iter().map(py_repr).collect();
    let details = format!("{name}: {} not in [{}]", py_repr(value), listed.join(", "));
    Check::Error(error(
        "value_not_in_list",
        "Value not in list",
        &details,
        json!({"input_name": name, "input_config": config(spec), "received_value": value}),
    ))
}
