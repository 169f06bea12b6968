//! The learner crate reads in one direction: every `crate::` path in a module names a module
//! declared before it in lib.rs, so there is no import circle.
use std::path::{Path, PathBuf};

/// learner/src's modules in the order lib.rs declares them: from the bottom up.
fn declared_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|line| line.strip_prefix("pub mod "))
        .map(|rest| rest.trim_end_matches(';').trim().to_string())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of learner/src belongs to (`parallel/zero.rs` is `parallel`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// Every module named as `crate::NAME` on a line of code (comments skipped).
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            found.push((number + 1, name));
            rest = after;
        }
    }
    found
}

#[test]
fn learner_modules_import_only_modules_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let order = declared_order(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(order.len() > 10, "lib.rs declares {order:?}");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let position = |name: &str| order.iter().position(|m| m == name);
    let mut offences = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "lib" {
            continue;
        }
        let Some(mine) = position(&module) else {
            offences.push(format!(
                "{}: module {module} is not declared in lib.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (line, name) in crate_paths(&text) {
            match position(&name) {
                Some(theirs) if theirs <= mine => {}
                Some(_) => offences.push(format!(
                    "{}:{line}: {module} imports {name}, which sits above it",
                    file.display()
                )),
                None => offences.push(format!(
                    "{}:{line}: crate::{name} is not a module declared in lib.rs",
                    file.display()
                )),
            }
        }
    }
    assert!(offences.is_empty(), "{}", offences.join("\n"));
}

#[test]
fn the_order_comes_from_the_declarations() {
    let lib = "//! doc\n/// Errors.\npub mod error;\n\n/// Config.\npub mod config;\npub use config::X;\n";
    assert_eq!(declared_order(lib), vec!["error", "config"]);
}

#[test]
fn the_check_sees_an_upward_import() {
    let found = crate_paths(
        "use crate::service::Shared;\n// crate::ranks in a comment\nlet x = crate::eval::f();",
    );
    assert_eq!(
        found,
        vec![(1, "service".to_string()), (3, "eval".to_string())]
    );
}
