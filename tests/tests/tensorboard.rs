//! The learner's TensorBoard event files, read back by TensorBoard's own loader (the PyPI
//! `tensorboard` package): every scalar at its step and value, NaN kept, and a second file
//! (a resumed run) read together with the first.
use prime_learner::tensorboard::EventWriter;
use prime_tests::*;
use serde_json::{json, Value};

fn read(dir: &std::path::Path) -> Value {
    run_python("tests/python/tensorboard_read.py", &[path_str(dir)])
}

#[test]
fn tensorboard_reads_our_event_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tensorboard");
    let mut writer = EventWriter::create(&dir, 1).unwrap();
    let scalars = |loss: f64, acc: f64| {
        vec![
            ("actor/pg_loss".to_string(), loss),
            ("val/test_score/prime_arith".to_string(), acc),
        ]
    };
    writer.scalars(1, &scalars(0.25, 0.5)).unwrap();
    writer.scalars(2, &scalars(-1.5, f64::NAN)).unwrap();
    writer.scalars(3, &scalars(1e-7, 1.0)).unwrap();
    // Readable while the writer is still open: each call is flushed.
    let live = read(&dir);
    assert_eq!(
        live["actor/pg_loss"],
        json!([[1, 0.25], [2, -1.5], [3, 1e-7f32 as f64]])
    );
    assert_eq!(
        live["val/test_score/prime_arith"],
        json!([[1, 0.5], [2, null], [3, 1.0]])
    );
    drop(writer);

    // A run resumed from the checkpoint of step 2 opens a second file, which must not replace
    // the first one, and writes step 3 again: TensorBoard shows the new step 3 only.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let mut resumed = EventWriter::create(&dir, 3).unwrap();
    resumed.scalars(3, &scalars(0.375, 0.25)).unwrap();
    resumed.scalars(4, &scalars(0.125, 0.75)).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    let both = read(&dir);
    assert_eq!(
        both["actor/pg_loss"],
        json!([[1, 0.25], [2, -1.5], [3, 0.375], [4, 0.125]])
    );
    assert_eq!(
        both["val/test_score/prime_arith"],
        json!([[1, 0.5], [2, null], [3, 0.25], [4, 0.75]])
    );
}

#[test]
fn a_damaged_record_is_not_read_as_data() {
    // TensorBoard checks the CRCs: flipping a byte of a value makes the reader drop the
    // record, so a wrong checksum in our framing would show as missing scalars above.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tb");
    let mut writer = EventWriter::create(&dir, 1).unwrap();
    writer
        .scalars(1, &[("actor/pg_loss".to_string(), 0.5)])
        .unwrap();
    let path = writer.path().to_path_buf();
    drop(writer);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 6;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let read = read(&dir);
    assert!(read.get("actor/pg_loss").is_none(), "{read}");
}
