//! Finds an example's binary next to the test's own (`cargo test` builds examples before
//! running tests), building it first when only the test target was built (`cargo test
//! --test proxy`) and the binary is missing or older than its sources.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The binary of example `name`, whose own sources are under `examples/<name>`.
pub(crate) fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/examples/<name>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if is_stale(&binary, &format!("examples/{name}")) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        build.args(["build", "--example", name]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building the {name} example failed");
    }
    binary
}

/// Is `binary` missing, or older than a source it is built from (the library's or the
/// example's own)?
fn is_stale(binary: &Path, example_dir: &str) -> bool {
    fn newest(dir: &Path) -> SystemTime {
        let mut latest = SystemTime::UNIX_EPOCH;
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let modified = if path.is_dir() {
                newest(&path)
            } else {
                entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(latest)
            };
            latest = latest.max(modified);
        }
        latest
    }
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return true;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    ["src", example_dir]
        .iter()
        .any(|dir| newest(&root.join(dir)) > built)
}
