//! End-to-end checks of `build_world` and the data readers.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use prime_world::{
    build_world, read_rows, write_rows, DataRow, Split, SplitConfig, WorldConfig, WorldError,
    WorldFiles, MATH_SUFFIX, STEP_SEPARATOR,
};

fn small_config(seed: u64) -> WorldConfig {
    WorldConfig {
        seed,
        sft: SplitConfig::with_size(300),
        rl: SplitConfig::with_size(200),
        heldout: SplitConfig::with_size(100),
        vocab_size: 400,
        ..WorldConfig::default()
    }
}

fn all_files(files: &WorldFiles) -> Vec<PathBuf> {
    let mut paths = vec![
        files.manifest.clone(),
        files.tokenizer_json.clone(),
        files.tokenizer_config.clone(),
    ];
    for split in Split::ALL {
        paths.push(files.split(split).jsonl.clone());
        paths.push(files.split(split).parquet.clone());
    }
    paths
}

#[test]
fn splits_have_the_configured_sizes_schema_and_no_shared_questions() {
    let dir = tempfile::tempdir().unwrap();
    let files = build_world(&small_config(1), dir.path()).unwrap();
    assert!(!files.reused);
    assert_eq!(files.root, dir.path());
    assert_eq!(files.sft.parquet, dir.path().join("data/sft.parquet"));
    assert_eq!(
        files.tokenizer_json,
        dir.path().join("tokenizer/tokenizer.json")
    );

    let mut seen = HashSet::new();
    for (split, size) in [(Split::Sft, 300), (Split::Rl, 200), (Split::Heldout, 100)] {
        let from_jsonl = read_rows(&files.split(split).jsonl).unwrap();
        let from_parquet = read_rows(&files.split(split).parquet).unwrap();
        assert_eq!(from_jsonl.len(), size);
        assert_eq!(
            from_jsonl, from_parquet,
            "{split:?}: jsonl and parquet differ"
        );
        for (i, row) in from_jsonl.iter().enumerate() {
            assert_eq!(row.data_source, "prime_arith");
            assert_eq!(row.ability, "math");
            assert_eq!(row.reward_model.style, "rule");
            assert_eq!(row.prompt.len(), 1, "no system prompt by default");
            assert_eq!(row.prompt[0].role, "user");
            let question = row.prompt[0].content.strip_suffix(MATH_SUFFIX).unwrap();
            assert!(
                seen.insert(question.to_string()),
                "duplicate question {question}"
            );
            let info = row.extra_info.as_ref().unwrap();
            assert_eq!(info.split, split.name());
            assert_eq!(info.index, i as i64);
            assert!((2..=5).contains(&info.num_ops.unwrap()));
            assert!(info.template.is_some());
            match split {
                Split::Sft => {
                    let response = row.response.as_ref().unwrap();
                    let boxed = format!("\\boxed{{{}}}", row.reward_model.ground_truth);
                    assert!(response.ends_with(&boxed), "{response}");
                    let steps = response.split(STEP_SEPARATOR).count() - 1;
                    assert_eq!(steps as i64, info.num_ops.unwrap());
                }
                _ => assert!(row.response.is_none()),
            }
        }
    }
    assert_eq!(seen.len(), 600);
    let stats = &files.stats;
    assert!(
        (300..=400).contains(&stats.vocab_size),
        "{}",
        stats.vocab_size
    );
    assert_eq!(stats.sft.rows, 300);
    assert!(stats.sft.response_mean.unwrap() > 10.0);
    assert!(stats.rl.response_mean.is_none());
    assert!(stats.heldout.prompt_max >= stats.heldout.prompt_mean as usize);
}

#[test]
fn system_prompt_becomes_the_first_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        system_prompt: Some("Think step by step.".into()),
        ..small_config(2)
    };
    let files = build_world(&cfg, dir.path()).unwrap();
    let rows = read_rows(&files.rl.parquet).unwrap();
    assert_eq!(rows[0].prompt[0].role, "system");
    assert_eq!(rows[0].prompt[0].content, "Think step by step.");
    assert_eq!(rows[0].prompt[1].role, "user");
}

#[test]
fn same_seed_gives_the_same_bytes_and_another_seed_does_not() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let files_a = build_world(&small_config(5), a.path()).unwrap();
    let files_b = build_world(&small_config(5), b.path()).unwrap();
    let files_c = build_world(&small_config(6), c.path()).unwrap();
    for ((pa, pb), pc) in all_files(&files_a)
        .iter()
        .zip(all_files(&files_b))
        .zip(all_files(&files_c))
    {
        let bytes_a = std::fs::read(pa).unwrap();
        assert_eq!(
            bytes_a,
            std::fs::read(&pb).unwrap(),
            "{} differs",
            pa.display()
        );
        if pa.extension().is_some_and(|e| e == "jsonl") {
            assert_ne!(bytes_a, std::fs::read(&pc).unwrap(), "seed ignored");
        }
    }
}

#[test]
fn rebuild_is_skipped_for_the_same_config_and_done_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_config(3);
    let first = build_world(&cfg, dir.path()).unwrap();
    let stamp = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let before = stamp(&first.sft.parquet);

    let second = build_world(&cfg, dir.path()).unwrap();
    assert!(second.reused);
    assert_eq!(second.stats, first.stats);
    assert_eq!(stamp(&second.sft.parquet), before);

    std::fs::write(&first.heldout.jsonl, "tampered\n").unwrap();
    let repaired = build_world(&cfg, dir.path()).unwrap();
    assert!(!repaired.reused);
    assert_eq!(read_rows(&repaired.heldout.jsonl).unwrap().len(), 100);

    let changed = WorldConfig {
        heldout: SplitConfig::with_size(50),
        ..cfg
    };
    let rebuilt = build_world(&changed, dir.path()).unwrap();
    assert!(!rebuilt.reused);
    assert_eq!(read_rows(&rebuilt.heldout.parquet).unwrap().len(), 50);
}

#[test]
fn resizing_a_training_split_keeps_the_heldout_split() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let files_a = build_world(&small_config(4), a.path()).unwrap();
    let bigger = WorldConfig {
        sft: SplitConfig::with_size(400),
        ..small_config(4)
    };
    let files_b = build_world(&bigger, b.path()).unwrap();
    assert_eq!(
        std::fs::read(&files_a.heldout.jsonl).unwrap(),
        std::fs::read(&files_b.heldout.jsonl).unwrap()
    );
}

#[test]
fn impossible_sizes_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WorldConfig {
        max_start: 2,
        max_addend: 1,
        max_factor: 2,
        sft: SplitConfig {
            size: 1000,
            min_ops: 1,
            max_ops: 1,
        },
        ..small_config(0)
    };
    let err = build_world(&cfg, dir.path()).unwrap_err();
    assert!(
        matches!(&err, WorldError::Config(m) if m.contains("distinct problems")),
        "{err}"
    );
}

fn sample_rows() -> Vec<DataRow> {
    let line = r#"{"data_source":"numina_olympiads","prompt":[{"role":"system","content":"S"},{"role":"user","content":"Q"}],"ability":"math","reward_model":{"style":"rule","ground_truth":"\\frac{1}{2}"},"extra_info":{"split":"dummy","index":0}}"#;
    vec![serde_json::from_str(line).unwrap()]
}

#[test]
fn rows_from_other_sources_round_trip_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let rows = sample_rows();
    for name in ["x.jsonl", "x.parquet"] {
        let path = dir.path().join(name);
        write_rows(&path, &rows).unwrap();
        assert_eq!(read_rows(&path).unwrap(), rows, "{name}");
    }
    let err = write_rows(&dir.path().join("x.csv"), &rows).unwrap_err();
    assert!(err.to_string().contains("x.csv"), "{err}");
}

#[test]
fn parquet_compressed_with_snappy_zstd_or_gzip_reads_back() {
    use parquet::basic::{Compression, GzipLevel, ZstdLevel};

    let dir = tempfile::tempdir().unwrap();
    let mut rows = sample_rows();
    // Enough repeated text that every codec actually compresses the pages.
    for i in 0..50 {
        let mut row = rows[0].clone();
        row.prompt[1].content = format!("question {i}: {}", "the same words ".repeat(20));
        rows.push(row);
    }
    let codecs = [
        ("snappy", Compression::SNAPPY),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
        ("gzip", Compression::GZIP(GzipLevel::default())),
    ];
    for (name, compression) in codecs {
        let path = dir.path().join(format!("{name}.parquet"));
        prime_world::dataset::write_parquet_compressed(&path, &rows, compression).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let metadata = parquet::file::reader::FileReader::metadata(
            &parquet::file::reader::SerializedFileReader::new(file).unwrap(),
        )
        .clone();
        let written = metadata.row_group(0).column(0).compression();
        assert_eq!(written, compression, "{name}: the file holds {written:?}");
        assert_eq!(read_rows(&path).unwrap(), rows, "{name}");
    }
}

#[test]
fn rows_are_read_one_by_one_so_a_bad_row_leaves_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.jsonl");
    let good = serde_json::to_string(&sample_rows()[0]).unwrap();
    let bad_role = good.replace(r#""role":"system""#, r#""role":"robot""#);
    std::fs::write(&path, format!("{good}\n\n{{not json\n{bad_role}\n{good}\n")).unwrap();
    let results = prime_world::read_row_results(&path).unwrap();
    assert_eq!(results.len(), 4, "blank lines are not rows");
    assert_eq!(results[0].as_ref().unwrap(), &sample_rows()[0]);
    assert!(
        matches!(&results[1], Err(WorldError::Json { line: 3, .. })),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(&results[2], Err(WorldError::Row { row: 2, field, .. }) if field == "prompt[0].role"),
        "{:?}",
        results[2]
    );
    assert!(results[3].is_ok());
    // The strict reader stops at the first bad row.
    assert!(matches!(
        read_rows(&path).unwrap_err(),
        WorldError::Json { line: 3, .. }
    ));

    // The same rows in parquet: row 1 is bad, rows 0 and 2 read.
    let mut rows = vec![sample_rows()[0].clone(); 3];
    rows[1].prompt[0].role = "robot".into();
    let parquet = dir.path().join("mixed.parquet");
    write_rows(&parquet, &rows).unwrap();
    let results = prime_world::read_row_results(&parquet).unwrap();
    assert_eq!(results.len(), 3);
    assert!(results[0].is_ok() && results[2].is_ok());
    assert!(
        matches!(&results[1], Err(WorldError::Row { row: 1, .. })),
        "{:?}",
        results[1]
    );
    // A file-level problem is the outer error.
    assert!(prime_world::read_row_results(&dir.path().join("absent.parquet")).is_err());
}

#[test]
fn bad_jsonl_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    let good = serde_json::to_string(&sample_rows()[0]).unwrap();

    std::fs::write(&path, format!("{good}\n\n{{not json\n")).unwrap();
    let err = read_rows(&path).unwrap_err();
    assert!(matches!(err, WorldError::Json { line: 3, .. }), "{err}");
    assert!(err.to_string().contains("bad.jsonl: line 3"), "{err}");

    let missing = good.replace(r#""ground_truth":"\\frac{1}{2}""#, r#""truth":"1""#);
    std::fs::write(&path, format!("{good}\n{missing}\n")).unwrap();
    let err = read_rows(&path).unwrap_err().to_string();
    assert!(
        err.contains("line 2") && err.contains("ground_truth"),
        "{err}"
    );

    let empty_truth = good.replace(r#""\\frac{1}{2}""#, r#""""#);
    std::fs::write(&path, format!("{good}\n{empty_truth}\n")).unwrap();
    let err = read_rows(&path).unwrap_err().to_string();
    assert!(
        err.contains("row 1") && err.contains("reward_model.ground_truth"),
        "{err}"
    );

    let bad_role = good.replace(r#""role":"system""#, r#""role":"robot""#);
    std::fs::write(&path, bad_role).unwrap();
    let err = read_rows(&path).unwrap_err().to_string();
    assert!(
        err.contains("row 0") && err.contains("prompt[0].role"),
        "{err}"
    );
}

#[test]
fn bad_parquet_names_file_column_and_row() {
    use std::sync::Arc;

    use arrow_array::{RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.parquet");
    let write = |batch: RecordBatch| {
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
    };

    let schema = Schema::new(vec![Field::new("data_source", DataType::Utf8, true)]);
    write(
        RecordBatch::try_new(
            Arc::new(schema),
            vec![Arc::new(StringArray::from(vec!["a"]))],
        )
        .unwrap(),
    );
    let err = read_rows(&path).unwrap_err();
    assert!(
        matches!(&err, WorldError::Schema { field, .. } if field == "prompt"),
        "{err}"
    );
    assert!(err.to_string().contains("bad.parquet"), "{err}");

    // A null ground truth in the second row.
    let good = dir.path().join("good.parquet");
    let mut rows = sample_rows();
    rows.push(rows[0].clone());
    write_rows(&good, &rows).unwrap();
    let file = std::fs::File::open(&good).unwrap();
    let batch = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let reward_model = batch
        .column_by_name("reward_model")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow_array::StructArray>()
        .unwrap()
        .clone();
    let (fields, mut columns, nulls) = reward_model.into_parts();
    columns[1] = Arc::new(StringArray::from(vec![Some("1"), None]));
    let reward_model = arrow_array::StructArray::new(fields, columns, nulls);
    let index = batch.schema().index_of("reward_model").unwrap();
    let mut all: Vec<_> = batch.columns().to_vec();
    all[index] = Arc::new(reward_model);
    write(RecordBatch::try_new(batch.schema(), all).unwrap());
    let err = read_rows(&path).unwrap_err();
    assert!(
        matches!(&err, WorldError::Row { row: 1, field, .. } if field == "reward_model.ground_truth"),
        "{err}"
    );

    let err = read_rows(&dir.path().join("missing.parquet")).unwrap_err();
    assert!(err.to_string().contains("missing.parquet"), "{err}");
}

#[test]
fn parquet_with_large_and_view_types_and_other_field_order_reads() {
    use std::sync::Arc;

    use arrow_array::builder::{
        Int32Builder, LargeListBuilder, LargeStringBuilder, StringViewBuilder, StructBuilder,
    };
    use arrow_array::{ArrayRef, RecordBatch};
    use arrow_schema::{DataType, Field, Fields};

    let large = |name: &str| Field::new(name, DataType::LargeUtf8, true);
    let message_fields = Fields::from(vec![large("content"), large("role")]);
    let mut prompt =
        LargeListBuilder::new(StructBuilder::from_fields(message_fields.clone(), 2)).with_field(
            Field::new("element", DataType::Struct(message_fields), true),
        );
    for (role, content) in [("system", "S"), ("user", "What is 2+2?")] {
        let messages = prompt.values();
        let text = |b: &mut StructBuilder, i: usize, v: &str| {
            b.field_builder::<LargeStringBuilder>(i)
                .unwrap()
                .append_value(v)
        };
        text(messages, 0, content);
        text(messages, 1, role);
        messages.append(true);
    }
    prompt.append(true);
    let mut reward_model =
        StructBuilder::from_fields(Fields::from(vec![large("ground_truth"), large("style")]), 1);
    for (i, v) in ["4", "rule"].into_iter().enumerate() {
        reward_model
            .field_builder::<LargeStringBuilder>(i)
            .unwrap()
            .append_value(v);
    }
    reward_model.append(true);
    let mut extra_info = StructBuilder::from_fields(
        Fields::from(vec![
            Field::new("index", DataType::Int32, true),
            large("split"),
        ]),
        1,
    );
    extra_info
        .field_builder::<Int32Builder>(0)
        .unwrap()
        .append_value(7);
    extra_info
        .field_builder::<LargeStringBuilder>(1)
        .unwrap()
        .append_value("test");
    extra_info.append(true);
    let mut data_source = LargeStringBuilder::new();
    data_source.append_value("numina_cn_k12");
    let mut ability = StringViewBuilder::new();
    ability.append_value("math");

    let columns: Vec<(&str, ArrayRef)> = vec![
        ("ability", Arc::new(ability.finish())),
        ("prompt", Arc::new(prompt.finish())),
        ("reward_model", Arc::new(reward_model.finish())),
        ("data_source", Arc::new(data_source.finish())),
        ("extra_info", Arc::new(extra_info.finish())),
    ];
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hf.parquet");
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();

    let rows = read_rows(&path).unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.data_source, "numina_cn_k12");
    assert_eq!(row.ability, "math");
    assert_eq!(row.prompt[0].role, "system");
    assert_eq!(row.question(), Some("What is 2+2?"));
    assert_eq!(row.reward_model.ground_truth, "4");
    assert_eq!(row.reward_model.style, "rule");
    let info = row.extra_info.as_ref().unwrap();
    assert_eq!((info.split.as_str(), info.index), ("test", 7));
    assert_eq!((info.num_ops, info.template.as_ref()), (None, None));
    assert_eq!(row.response, None);
}
