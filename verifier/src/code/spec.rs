//! The test spec of a code problem and the forms its inputs and outputs take.
//!
//! The reference harnesses write the same tests in two ways (spec 8.3):
//!
//! - PRIME and verl's `prime_code` (the form of Eurus-2-RL-Data): every input and output is a
//!   string. Stdin problems hold the stdin and stdout texts; call-based problems (`fn_name`)
//!   hold one JSON value per line (one per argument) as input and the JSON text of the return
//!   value as output, decoded with a JSON parser before comparing.
//! - APPS: call-based inputs are arrays of arguments and outputs are JSON values, usually
//!   wrapped in a one-element list; stdin inputs and outputs may be lists of lines.
//!
//! Both are accepted. Call-based outputs are JSON text when every one of them is a string
//! holding valid JSON (the PRIME form, which the reference decodes unconditionally);
//! otherwise they are the values themselves (a string output is then a Python string).

use crate::error::VerifierError;
use serde_json::Value;

/// The test spec of a code problem (Eurus-2-RL-Data `ground_truth`, a JSON string).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TestSpec {
    /// Per test: the whole stdin text, or (call-based) the arguments.
    pub inputs: Vec<Value>,
    /// Per test: the expected stdout text, or (call-based) the expected return value.
    pub outputs: Vec<Value>,
    /// The function to call; absent for stdin/stdout problems.
    #[serde(default)]
    pub fn_name: Option<String>,
}

impl TestSpec {
    /// Parses and checks a spec.
    pub fn parse(json: &str) -> Result<Self, VerifierError> {
        let spec: TestSpec = serde_json::from_str(json)
            .map_err(|e| VerifierError::InvalidRequest(format!("bad test spec: {e}")))?;
        if spec.inputs.len() != spec.outputs.len() {
            return Err(VerifierError::InvalidRequest(format!(
                "test spec has {} inputs but {} outputs",
                spec.inputs.len(),
                spec.outputs.len()
            )));
        }
        if spec.inputs.is_empty() {
            return Err(VerifierError::InvalidRequest(
                "test spec has no tests".into(),
            ));
        }
        if let Some(name) = &spec.fn_name {
            if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return Err(VerifierError::InvalidRequest(format!(
                    "fn_name {name:?} is not an identifier"
                )));
            }
        }
        Ok(spec)
    }

    /// The expected return values of a call-based spec: the outputs decoded as JSON text when
    /// every output is a string holding JSON, otherwise the outputs as given.
    pub fn call_outputs(&self) -> Vec<Value> {
        let decoded: Option<Vec<Value>> = self
            .outputs
            .iter()
            .map(|o| match o {
                Value::String(text) => serde_json::from_str(text).ok(),
                _ => None,
            })
            .collect();
        decoded.unwrap_or_else(|| self.outputs.clone())
    }
}

/// A stdin input or expected stdout as text: a string as is; a list of strings as its lines
/// joined by `\n` (APPS); nothing (`null`) as the empty text; any other value as its JSON.
pub fn stdio_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        other => other.to_string(),
    }
}

/// Call-based arguments. A string holds one JSON value per line, one per argument (blank
/// lines skipped; the empty string is no arguments); when some line is not JSON, the whole
/// string as one JSON value, or failing that the string itself, is the single argument. An
/// array is the argument list (APPS); any other value is the single argument.
pub fn call_arguments(input: &Value) -> Vec<Value> {
    match input {
        Value::String(s) => {
            let lines: Option<Vec<Value>> = s
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).ok())
                .collect();
            lines.unwrap_or_else(|| {
                vec![serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))]
            })
        }
        Value::Array(args) => args.clone(),
        other => vec![other.clone()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(outputs: Value) -> TestSpec {
        let n = outputs.as_array().map_or(0, Vec::len);
        let inputs = vec![json!(""); n];
        TestSpec::parse(&json!({"fn_name": "f", "inputs": inputs, "outputs": outputs}).to_string())
            .unwrap()
    }

    #[test]
    fn outputs_as_json_text_are_decoded() {
        let s = spec(json!(["3", "[1, 2]", "\"olleh\"", "true", "2.5", "null"]));
        assert_eq!(
            s.call_outputs(),
            [
                json!(3),
                json!([1, 2]),
                json!("olleh"),
                json!(true),
                json!(2.5),
                json!(null)
            ]
        );
    }

    #[test]
    fn outputs_as_values_stay_values() {
        // A non-string output: the APPS form, strings are Python strings.
        let s = spec(json!([[3], "3"]));
        assert_eq!(s.call_outputs(), [json!([3]), json!("3")]);
        // A string that is not JSON: the strings are the values.
        let s = spec(json!(["olleh", "3"]));
        assert_eq!(s.call_outputs(), [json!("olleh"), json!("3")]);
    }

    #[test]
    fn argument_forms() {
        assert_eq!(
            call_arguments(&json!("[1, 2]\n3\n")),
            [json!([1, 2]), json!(3)]
        );
        assert_eq!(
            call_arguments(&json!("\"a b\"\n{\"k\": 1}")),
            [json!("a b"), json!({"k": 1})]
        );
        assert!(call_arguments(&json!("")).is_empty());
        assert_eq!(
            call_arguments(&json!([[2, 7], 9])),
            [json!([2, 7]), json!(9)]
        );
        assert_eq!(call_arguments(&json!(5)), [json!(5)]);
        // A pretty-printed value spanning lines; a bare word.
        assert_eq!(call_arguments(&json!("[\n 1,\n 2\n]")), [json!([1, 2])]);
        assert_eq!(call_arguments(&json!("hello")), [json!("hello")]);
    }

    #[test]
    fn stdio_forms() {
        assert_eq!(stdio_text(&json!("1 2\n")), "1 2\n");
        assert_eq!(stdio_text(&json!(["1 2", "3"])), "1 2\n3");
        assert_eq!(stdio_text(&json!(null)), "");
        assert_eq!(stdio_text(&json!(7)), "7");
    }
}
