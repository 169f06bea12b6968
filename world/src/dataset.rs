//! Reading and writing rows as jsonl or parquet, in the column layout of the Hugging Face
//! Eurus-2-RL-Data parquet: `prompt` is `list<struct<role, content>>`, `reward_model` and
//! `extra_info` are structs. Readers look columns and struct fields up by name and accept the
//! string and list types pyarrow may write (`string`, `large_string`, `string_view`, `list`,
//! `large_list`), so parquet files made by `datasets` read as well as ours.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{Int64Builder, ListBuilder, StringBuilder, StructBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::{ChatMessage, DataRow, ExtraInfo, RewardModel, WorldError};

/// The on-disk formats, chosen by file extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// One JSON object per line (`.jsonl`).
    Jsonl,
    /// Apache Parquet (`.parquet`).
    Parquet,
}

impl DataFormat {
    /// The format for `path`'s extension.
    pub fn from_path(path: &Path) -> Result<Self, WorldError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => Ok(DataFormat::Jsonl),
            Some("parquet") => Ok(DataFormat::Parquet),
            _ => Err(WorldError::UnknownFormat {
                path: path.to_path_buf(),
            }),
        }
    }
}

/// Reads every row of a `.jsonl` or `.parquet` file and checks it (see [`DataRow::check`]);
/// the first bad row is the error.
pub fn read_rows(path: &Path) -> Result<Vec<DataRow>, WorldError> {
    read_row_results(path)?.into_iter().collect()
}

/// Every row of a `.jsonl` or `.parquet` file, each read and checked on its own: element `i`
/// is row `i` of the file (jsonl: its `i`-th non-blank line), or why that row is bad (a
/// [`WorldError::Json`] or [`WorldError::Row`]). The outer error is about the whole file
/// (missing, not parquet, a missing or mistyped column).
pub fn read_row_results(path: &Path) -> Result<Vec<Result<DataRow, WorldError>>, WorldError> {
    match DataFormat::from_path(path)? {
        DataFormat::Jsonl => jsonl_row_results(path),
        DataFormat::Parquet => parquet_row_results(path),
    }
}

/// Writes rows to a `.jsonl` or `.parquet` file, replacing it.
pub fn write_rows(path: &Path, rows: &[DataRow]) -> Result<(), WorldError> {
    match DataFormat::from_path(path)? {
        DataFormat::Jsonl => write_jsonl(path, rows),
        DataFormat::Parquet => write_parquet(path, rows),
    }
}

/// Writes one JSON object per row; optional fields that are `None` are left out.
pub fn write_jsonl(path: &Path, rows: &[DataRow]) -> Result<(), WorldError> {
    let io = |e| WorldError::io(path, e);
    let mut out = BufWriter::new(File::create(path).map_err(io)?);
    for row in rows {
        serde_json::to_writer(&mut out, row).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)
}

/// Reads a jsonl file; blank lines are skipped; the first bad row is the error.
pub fn read_jsonl(path: &Path) -> Result<Vec<DataRow>, WorldError> {
    jsonl_row_results(path)?.into_iter().collect()
}

/// The rows of a jsonl file, each parsed and checked on its own; blank lines are skipped.
fn jsonl_row_results(path: &Path) -> Result<Vec<Result<DataRow, WorldError>>, WorldError> {
    let io = |e| WorldError::io(path, e);
    let reader = BufReader::new(File::open(path).map_err(io)?);
    let mut rows = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let row = serde_json::from_str::<DataRow>(&line)
            .map_err(|source| WorldError::Json {
                path: path.to_path_buf(),
                line: i + 1,
                source,
            })
            .and_then(|row| checked(path, rows.len(), row));
        rows.push(row);
    }
    Ok(rows)
}

/// `data` when it passes [`DataRow::check`], else the error naming row `row` of `path`.
fn checked(path: &Path, row: usize, data: DataRow) -> Result<DataRow, WorldError> {
    match data.check() {
        Ok(()) => Ok(data),
        Err((field, reason)) => Err(WorldError::Row {
            path: path.to_path_buf(),
            row,
            field,
            reason,
        }),
    }
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn message_fields() -> Fields {
    Fields::from(vec![utf8("role"), utf8("content")])
}

fn reward_model_fields() -> Fields {
    Fields::from(vec![utf8("style"), utf8("ground_truth")])
}

fn extra_info_fields() -> Fields {
    Fields::from(vec![
        utf8("split"),
        Field::new("index", DataType::Int64, true),
        Field::new("num_ops", DataType::Int64, true),
        utf8("template"),
    ])
}

/// Writes rows as one parquet file (snappy). The `response` column is written only when
/// some row has a response, so RL and held-out files have exactly the Eurus-2-RL-Data columns
/// (plus this world's extra `extra_info` fields).
pub fn write_parquet(path: &Path, rows: &[DataRow]) -> Result<(), WorldError> {
    write_parquet_compressed(path, rows, Compression::SNAPPY)
}

/// [`write_parquet`] with another compression (zstd and gzip are what pyarrow and `datasets`
/// commonly write besides snappy).
pub fn write_parquet_compressed(
    path: &Path,
    rows: &[DataRow],
    compression: Compression,
) -> Result<(), WorldError> {
    let mut writer = ParquetRowWriter::create(path, compression)?;
    writer.write(rows)?;
    writer.close()
}

/// Writes one parquet file a batch of rows at a time, so a large split never has to be held
/// as one arrow batch. The first batch decides the columns (`response` only when one of its
/// rows has a response); every later batch must agree.
pub struct ParquetRowWriter {
    path: std::path::PathBuf,
    file: Option<File>,
    props: Option<WriterProperties>,
    writer: Option<ArrowWriter<File>>,
}

impl ParquetRowWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path, compression: Compression) -> Result<Self, WorldError> {
        let file = File::create(path).map_err(|e| WorldError::io(path, e))?;
        Ok(ParquetRowWriter {
            path: path.to_path_buf(),
            file: Some(file),
            props: Some(
                WriterProperties::builder()
                    .set_compression(compression)
                    .build(),
            ),
            writer: None,
        })
    }

    fn parquet_error(&self, message: impl std::fmt::Display) -> WorldError {
        WorldError::Parquet {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Appends `rows` (at least one batch, possibly empty, makes a file with a schema).
    pub fn write(&mut self, rows: &[DataRow]) -> Result<(), WorldError> {
        let batch = to_record_batch(rows).map_err(|e| self.parquet_error(e))?;
        if self.writer.is_none() {
            let (file, props) = (self.file.take(), self.props.take());
            let file = file.expect("the file is open until the first batch");
            let writer = ArrowWriter::try_new(file, batch.schema(), props)
                .map_err(|e| self.parquet_error(e))?;
            self.writer = Some(writer);
        }
        let writer = self.writer.as_mut().expect("created above");
        let result = writer.write(&batch);
        result.map_err(|e| self.parquet_error(e))
    }

    /// Finishes the file (an empty file with the row columns when nothing was written).
    pub fn close(mut self) -> Result<(), WorldError> {
        if self.writer.is_none() {
            self.write(&[])?;
        }
        let writer = self.writer.take().expect("created by write");
        writer.close().map_err(|e| self.parquet_error(e))?;
        Ok(())
    }
}

fn string_field(builder: &mut StructBuilder, i: usize) -> &mut StringBuilder {
    builder
        .field_builder::<StringBuilder>(i)
        .expect("struct field built as Utf8")
}

fn to_record_batch(rows: &[DataRow]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut data_source = StringBuilder::new();
    let mut ability = StringBuilder::new();
    let mut prompt = ListBuilder::new(StructBuilder::from_fields(message_fields(), n * 2))
        .with_field(Field::new("item", DataType::Struct(message_fields()), true));
    let mut reward_model = StructBuilder::from_fields(reward_model_fields(), n);
    let mut extra_info = StructBuilder::from_fields(extra_info_fields(), n);
    let mut response = StringBuilder::new();

    for row in rows {
        data_source.append_value(&row.data_source);
        ability.append_value(&row.ability);

        let messages = prompt.values();
        for message in &row.prompt {
            string_field(messages, 0).append_value(&message.role);
            string_field(messages, 1).append_value(&message.content);
            messages.append(true);
        }
        prompt.append(true);

        string_field(&mut reward_model, 0).append_value(&row.reward_model.style);
        string_field(&mut reward_model, 1).append_value(&row.reward_model.ground_truth);
        reward_model.append(true);

        let info = row.extra_info.as_ref();
        string_field(&mut extra_info, 0).append_option(info.map(|x| &x.split));
        let ints = [info.map(|x| x.index), info.and_then(|x| x.num_ops)];
        for (i, value) in ints.into_iter().enumerate() {
            extra_info
                .field_builder::<Int64Builder>(i + 1)
                .expect("struct field built as Int64")
                .append_option(value);
        }
        string_field(&mut extra_info, 3).append_option(info.and_then(|x| x.template.as_ref()));
        extra_info.append(info.is_some());

        response.append_option(row.response.as_ref());
    }

    let mut columns: Vec<(&str, ArrayRef)> = vec![
        ("data_source", Arc::new(data_source.finish())),
        ("prompt", Arc::new(prompt.finish())),
        ("ability", Arc::new(ability.finish())),
        ("reward_model", Arc::new(reward_model.finish())),
        ("extra_info", Arc::new(extra_info.finish())),
    ];
    if rows.iter().any(|r| r.response.is_some()) {
        columns.push(("response", Arc::new(response.finish())));
    }
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, array)| Field::new(*name, array.data_type().clone(), true))
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, array)| array).collect(),
    )
}

/// Reads a parquet file with the Eurus-2-RL-Data columns; `extra_info` and `response` may be
/// absent. Each row is checked (see [`DataRow::check`]); the first bad row is the error.
/// Snappy, zstd and gzip compression are read.
pub fn read_parquet(path: &Path) -> Result<Vec<DataRow>, WorldError> {
    parquet_row_results(path)?.into_iter().collect()
}

/// The rows of a parquet file, each read and checked on its own.
fn parquet_row_results(path: &Path) -> Result<Vec<Result<DataRow, WorldError>>, WorldError> {
    // The parquet crate panics on some corrupt metadata instead of returning an error.
    prime_check::panics::catch(|| read_parquet_unchecked(path)).unwrap_or_else(|_| {
        Err(WorldError::Parquet {
            path: path.to_path_buf(),
            message: "corrupt parquet file (the reader panicked)".into(),
        })
    })
}

fn read_parquet_unchecked(path: &Path) -> Result<Vec<Result<DataRow, WorldError>>, WorldError> {
    let pq = |e: &dyn std::fmt::Display| WorldError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = File::open(path).map_err(|e| WorldError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| pq(&e))?
        .build()
        .map_err(|e| pq(&e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| pq(&e))?;
        let columns = Columns::new(path, &batch)?;
        for i in 0..batch.num_rows() {
            let row = columns
                .row(i, rows.len())
                .and_then(|row| checked(path, rows.len(), row));
            rows.push(row);
        }
    }
    Ok(rows)
}

/// A string column of any of the layouts arrow uses.
enum Strings<'a> {
    Utf8(&'a arrow_array::StringArray),
    Large(&'a arrow_array::LargeStringArray),
    View(&'a arrow_array::StringViewArray),
}

impl<'a> Strings<'a> {
    fn new(array: &'a dyn Array) -> Option<Self> {
        match array.data_type() {
            DataType::Utf8 => Some(Strings::Utf8(array.as_string::<i32>())),
            DataType::LargeUtf8 => Some(Strings::Large(array.as_string::<i64>())),
            DataType::Utf8View => Some(Strings::View(array.as_string_view())),
            _ => None,
        }
    }

    fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            Strings::Utf8(a) => a.is_valid(i).then(|| a.value(i)),
            Strings::Large(a) => a.is_valid(i).then(|| a.value(i)),
            Strings::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// An integer column of any common width.
enum Ints<'a> {
    I64(&'a arrow_array::Int64Array),
    I32(&'a arrow_array::Int32Array),
    U64(&'a arrow_array::UInt64Array),
    U32(&'a arrow_array::UInt32Array),
}

impl<'a> Ints<'a> {
    fn new(array: &'a dyn Array) -> Option<Self> {
        match array.data_type() {
            DataType::Int64 => Some(Ints::I64(array.as_primitive::<Int64Type>())),
            DataType::Int32 => Some(Ints::I32(array.as_primitive::<Int32Type>())),
            DataType::UInt64 => Some(Ints::U64(array.as_primitive::<UInt64Type>())),
            DataType::UInt32 => Some(Ints::U32(array.as_primitive::<UInt32Type>())),
            _ => None,
        }
    }

    fn get(&self, i: usize) -> Option<i64> {
        match self {
            Ints::I64(a) => a.is_valid(i).then(|| a.value(i)),
            Ints::I32(a) => a.is_valid(i).then(|| i64::from(a.value(i))),
            Ints::U64(a) => a.is_valid(i).then(|| a.value(i) as i64),
            Ints::U32(a) => a.is_valid(i).then(|| i64::from(a.value(i))),
        }
    }
}

/// Offsets of a list column, so row `i` holds values `range(i)`.
enum Offsets<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Offsets<'_> {
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        match self {
            Offsets::I32(o) => o[i] as usize..o[i + 1] as usize,
            Offsets::I64(o) => o[i] as usize..o[i + 1] as usize,
        }
    }
}

/// The `extra_info` struct column and those of its fields that are present.
struct ExtraInfoColumns<'a> {
    array: &'a StructArray,
    split: Option<Strings<'a>>,
    index: Option<Ints<'a>>,
    num_ops: Option<Ints<'a>>,
    template: Option<Strings<'a>>,
}

/// Typed views of one record batch's columns, resolved by name once per batch.
struct Columns<'a> {
    path: &'a Path,
    data_source: Strings<'a>,
    ability: Strings<'a>,
    prompt: &'a dyn Array,
    prompt_offsets: Offsets<'a>,
    roles: Strings<'a>,
    contents: Strings<'a>,
    reward_model: &'a StructArray,
    style: Strings<'a>,
    ground_truth: Strings<'a>,
    extra_info: Option<ExtraInfoColumns<'a>>,
    response: Option<Strings<'a>>,
}

impl<'a> Columns<'a> {
    fn new(path: &'a Path, batch: &'a RecordBatch) -> Result<Self, WorldError> {
        let schema_error = |field: &str, reason: String| WorldError::Schema {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let required = |name: &str| {
            batch
                .column_by_name(name)
                .map(|c| c.as_ref())
                .ok_or_else(|| schema_error(name, "missing".into()))
        };
        let wrong_type = |name: &str, expected: &str, array: &dyn Array| {
            schema_error(
                name,
                format!("expected {expected}, found {}", array.data_type()),
            )
        };
        let strings = |name: &str, array: &'a dyn Array| {
            Strings::new(array).ok_or_else(|| wrong_type(name, "a string", array))
        };
        let structure = |name: &str, array: &'a dyn Array| {
            array
                .as_struct_opt()
                .ok_or_else(|| wrong_type(name, "a struct", array))
        };
        let field = |parent: &'a StructArray, parent_name: &str, name: &str| {
            parent
                .column_by_name(name)
                .map(|c| c.as_ref())
                .ok_or_else(|| schema_error(&format!("{parent_name}.{name}"), "missing".into()))
        };

        let prompt = required("prompt")?;
        let (prompt_offsets, messages) = match prompt.data_type() {
            DataType::List(_) => {
                let list = prompt.as_list::<i32>();
                (Offsets::I32(list.value_offsets()), list.values().as_ref())
            }
            DataType::LargeList(_) => {
                let list = prompt.as_list::<i64>();
                (Offsets::I64(list.value_offsets()), list.values().as_ref())
            }
            _ => return Err(wrong_type("prompt", "a list of messages", prompt)),
        };
        let messages = structure("prompt.item", messages)?;

        let reward_model = structure("reward_model", required("reward_model")?)?;
        let extra_info = match batch.column_by_name("extra_info") {
            None => None,
            Some(column) => {
                let array = structure("extra_info", column.as_ref())?;
                let optional_strings = |name: &str| match array.column_by_name(name) {
                    None => Ok(None),
                    Some(c) => strings(&format!("extra_info.{name}"), c.as_ref()).map(Some),
                };
                let optional_ints = |name: &str| match array.column_by_name(name) {
                    None => Ok(None),
                    Some(c) => Ints::new(c.as_ref())
                        .map(Some)
                        .ok_or_else(|| wrong_type(&format!("extra_info.{name}"), "an integer", c)),
                };
                Some(ExtraInfoColumns {
                    array,
                    split: optional_strings("split")?,
                    index: optional_ints("index")?,
                    num_ops: optional_ints("num_ops")?,
                    template: optional_strings("template")?,
                })
            }
        };
        let response = match batch.column_by_name("response") {
            None => None,
            Some(c) => Some(strings("response", c.as_ref())?),
        };

        Ok(Columns {
            path,
            data_source: strings("data_source", required("data_source")?)?,
            ability: strings("ability", required("ability")?)?,
            prompt,
            prompt_offsets,
            roles: strings("prompt.item.role", field(messages, "prompt.item", "role")?)?,
            contents: strings(
                "prompt.item.content",
                field(messages, "prompt.item", "content")?,
            )?,
            reward_model,
            style: strings(
                "reward_model.style",
                field(reward_model, "reward_model", "style")?,
            )?,
            ground_truth: strings(
                "reward_model.ground_truth",
                field(reward_model, "reward_model", "ground_truth")?,
            )?,
            extra_info,
            response,
        })
    }

    /// Row `i` of the batch; `file_row` is its index in the file, for error messages.
    fn row(&self, i: usize, file_row: usize) -> Result<DataRow, WorldError> {
        let null = |field: String| WorldError::Row {
            path: self.path.to_path_buf(),
            row: file_row,
            field,
            reason: "null".into(),
        };
        let text = |column: &Strings<'a>, index: usize, field: &str| {
            column
                .get(index)
                .map(str::to_string)
                .ok_or_else(|| null(field.to_string()))
        };

        if self.prompt.is_null(i) {
            return Err(null("prompt".into()));
        }
        let prompt = self
            .prompt_offsets
            .range(i)
            .enumerate()
            .map(|(m, j)| {
                Ok(ChatMessage {
                    role: text(&self.roles, j, &format!("prompt[{m}].role"))?,
                    content: text(&self.contents, j, &format!("prompt[{m}].content"))?,
                })
            })
            .collect::<Result<Vec<_>, WorldError>>()?;

        if self.reward_model.is_null(i) {
            return Err(null("reward_model".into()));
        }
        let reward_model = RewardModel {
            style: text(&self.style, i, "reward_model.style")?,
            ground_truth: text(&self.ground_truth, i, "reward_model.ground_truth")?,
        };

        let extra_info = match &self.extra_info {
            Some(extra) if extra.array.is_valid(i) => Some(ExtraInfo {
                split: extra
                    .split
                    .as_ref()
                    .and_then(|c| c.get(i))
                    .unwrap_or_default()
                    .to_string(),
                index: extra.index.as_ref().and_then(|c| c.get(i)).unwrap_or(0),
                num_ops: extra.num_ops.as_ref().and_then(|c| c.get(i)),
                template: extra
                    .template
                    .as_ref()
                    .and_then(|c| c.get(i))
                    .map(str::to_string),
                other: Default::default(),
            }),
            _ => None,
        };

        Ok(DataRow {
            data_source: text(&self.data_source, i, "data_source")?,
            prompt,
            ability: text(&self.ability, i, "ability")?,
            reward_model,
            extra_info,
            response: self
                .response
                .as_ref()
                .and_then(|c| c.get(i))
                .map(str::to_string),
        })
    }
}
