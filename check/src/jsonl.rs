//! JSONL input as every command reads it: UTF-8 with or without a byte-order mark, LF or CRLF
//! line ends, blank lines skipped, and an error that names the file and the line.
use std::path::Path;

use serde_json::Value;

use crate::path::FileError;

/// One non-blank line of a JSONL file.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    /// The line's JSON value.
    pub value: Value,
}

/// Reads `path`: every non-blank line must be one JSON value.
pub fn read(path: &Path) -> Result<Vec<Line>, FileError> {
    let bytes = std::fs::read(path).map_err(|e| FileError::io("reading", path, e))?;
    parse(path, &bytes)
}

/// Reads `path` and refuses a file without any line.
pub fn read_nonempty(path: &Path) -> Result<Vec<Line>, FileError> {
    let lines = read(path)?;
    if lines.is_empty() {
        return Err(FileError {
            path: path.to_path_buf(),
            line: None,
            message: "holds no lines".into(),
        });
    }
    Ok(lines)
}

/// The lines of `bytes`, read from `path` (for the messages).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Line>, FileError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut lines = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let number = i + 1;
        let text = std::str::from_utf8(raw)
            .map_err(|e| FileError::at_line(path, number, format!("not UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        let value = serde_json::from_str(text)
            .map_err(|e| FileError::at_line(path, number, format!("invalid JSON: {e}")))?;
        lines.push(Line { number, value });
    }
    Ok(lines)
}

/// The line's value as a `T`, with an error naming the file and the line.
pub fn decode<T: serde::de::DeserializeOwned>(path: &Path, line: &Line) -> Result<T, FileError> {
    serde_json::from_value(line.value.clone())
        .map_err(|e| FileError::at_line(path, line.number, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boms_crlf_and_blank_lines_are_read_and_errors_name_the_line() {
        let path = Path::new("in.jsonl");
        let lines = parse(path, b"\xEF\xBB\xBF{\"a\":1}\r\n\r\n  \n[2]\r\n").unwrap();
        assert_eq!(
            lines,
            [
                Line {
                    number: 1,
                    value: serde_json::json!({"a": 1})
                },
                Line {
                    number: 4,
                    value: serde_json::json!([2])
                }
            ]
        );
        let message = parse(path, b"{}\n{\"a\":\n").unwrap_err().to_string();
        assert!(
            message.starts_with("in.jsonl line 2: invalid JSON"),
            "{message}"
        );
        let message = parse(path, b"{}\n\xff\xfe\n").unwrap_err().to_string();
        assert!(
            message.starts_with("in.jsonl line 2: not UTF-8"),
            "{message}"
        );
        assert!(parse(path, b"").unwrap().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.jsonl");
        std::fs::write(&empty, "\n\n").unwrap();
        let message = read_nonempty(&empty).unwrap_err().to_string();
        assert!(
            message.ends_with("empty.jsonl: holds no lines"),
            "{message}"
        );
        let message = read(&dir.path().join("absent.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(message.contains("absent.jsonl: reading"), "{message}");
    }

    #[test]
    fn decode_names_the_line_and_the_field() {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Row {
            ids: Vec<i64>,
        }
        let path = Path::new("rows.jsonl");
        let lines = parse(path, b"{\"ids\":[1]}\n{\"ids\":\"x\"}\n").unwrap();
        assert!(decode::<Row>(path, &lines[0]).is_ok());
        let message = decode::<Row>(path, &lines[1]).unwrap_err().to_string();
        assert!(
            message.starts_with("rows.jsonl line 2: invalid type"),
            "{message}"
        );
    }
}
