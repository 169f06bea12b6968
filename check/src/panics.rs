//! Panics never reach a user as a trace. At the edges that hand user input to code that may
//! panic (libtorch through tch, the parquet reader), [`catch`] turns a panic into an error
//! message of one line. The binary installs [`install_hook`] and runs its main through
//! [`guard_main`]: any other panic is printed as one line and the process exits with
//! [`INTERNAL_ERROR`].
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};

/// The exit status of a panic that reached the binary: an internal error (a bug), not bad
/// input (`EX_SOFTWARE` of sysexits.h). Errors the user can fix exit with 1, and clap's usage
/// errors with 2.
pub const INTERNAL_ERROR: i32 = 70;

/// The longest panic message printed.
const MAX_CHARS: usize = 400;

thread_local! {
    /// How many [`catch`] calls are running on this thread.
    static CATCHING: Cell<usize> = const { Cell::new(0) };
    /// The last panic seen by the hook on this thread, for [`catch`] and [`guard_main`].
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic's message on one line. tch's panics carry libtorch's whole C++ trace inside an
/// `unwrap` of a `TchError`: only the error's first line is kept, marked as libtorch's.
pub fn one_line(message: &str) -> String {
    let message = message
        .strip_prefix("called `Result::unwrap()` on an `Err` value: ")
        .unwrap_or(message);
    let (message, torch) = match message.strip_prefix("Torch(\"") {
        Some(rest) => (rest, true),
        None => (message, false),
    };
    // tch's message arrives Debug-escaped (a literal `\n`) or raw.
    let first = message
        .split("\\n")
        .next()
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .trim_end_matches("\")")
        .trim();
    let mut line = if torch {
        format!("libtorch: {first}")
    } else {
        first.to_string()
    };
    if line.chars().count() > MAX_CHARS {
        line = line.chars().take(MAX_CHARS).collect::<String>() + "...";
    }
    line
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".into()
    }
}

/// Runs `f`; a panic inside it is `Err` with its one-line message (the installed hook stays
/// quiet about it).
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| {
        LAST.with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| one_line(&payload_text(payload.as_ref())))
    })
}

/// The binary's panic hook. On the main thread and inside [`catch`] it only records the
/// message (the catcher or [`guard_main`] reports it); a panic on any other thread is printed
/// as one line and ends the process with [`INTERNAL_ERROR`], since a service whose compute or
/// network thread died would otherwise hang.
pub fn install_hook() {
    panic::set_hook(Box::new(|info| {
        let message = payload_text(info.payload());
        let mut line = one_line(&message);
        if let Some(location) = info.location() {
            line = format!("{line} (at {}:{})", location.file(), location.line());
        }
        let thread = std::thread::current();
        let caught = CATCHING.with(Cell::get) > 0 || thread.name() == Some("main");
        if caught {
            LAST.with(|last| *last.borrow_mut() = Some(line));
            return;
        }
        eprintln!(
            "Error: internal error in thread {}: {line}",
            thread.name().unwrap_or("unnamed")
        );
        std::process::exit(INTERNAL_ERROR);
    }));
}

/// Runs the binary's main: a panic that reaches it is printed as one line and the process
/// exits with [`INTERNAL_ERROR`].
pub fn guard_main<T>(f: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(payload) => {
            let line = LAST
                .with(|last| last.borrow_mut().take())
                .unwrap_or_else(|| one_line(&payload_text(payload.as_ref())));
            eprintln!("Error: internal error: {line}");
            std::process::exit(INTERNAL_ERROR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_traces_become_their_first_line() {
        let tch = "called `Result::unwrap()` on an `Err` value: Torch(\"The size of tensor a (3) \
                   must match the size of tensor b (4) at non-singleton dimension 1\\nException \
                   raised from infer_size_impl at aten/src/ATen/ExpandUtils.cpp:31 (most recent \
                   call first):\\nframe #0: c10::Error::Error\")";
        assert_eq!(
            one_line(tch),
            "libtorch: The size of tensor a (3) must match the size of tensor b (4) at \
             non-singleton dimension 1"
        );
        assert_eq!(one_line("index out of bounds\nmore"), "index out of bounds");
        let long = "x".repeat(2000);
        assert_eq!(one_line(&long).chars().count(), MAX_CHARS + 3);
    }

    #[test]
    fn catch_turns_a_panic_into_its_message() {
        assert_eq!(catch(|| 3), Ok(3));
        let message = catch(|| -> i32 { panic!("boom at {}", 7) }).unwrap_err();
        assert_eq!(message, "boom at 7");
        let message = catch(|| {
            let v: Vec<i32> = Vec::new();
            v[1]
        })
        .unwrap_err();
        assert!(message.contains("index out of bounds"), "{message}");
        assert_eq!(CATCHING.with(Cell::get), 0);
    }
}
