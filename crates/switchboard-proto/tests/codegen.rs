//! The generated code under `src/generated/` is committed, so that a build needs no protoc. This test
//! regenerates it from `proto/` (with protox, in pure Rust) and fails when the committed copy differs.
//! Run with `SWITCHBOARD_REGENERATE=1` to write the new code instead.

use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "switchboard/internal/v1/common.proto",
    "switchboard/internal/v1/store.proto",
    "switchboard/internal/v1/router.proto",
    "switchboard/v1/chat.proto",
];

fn generate(into: &Path) {
    let proto_root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let descriptors = protox::compile(PROTOS, [&proto_root]).expect("the protos compile");
    std::fs::write(into.join("descriptor.bin"), prost::Message::encode_to_vec(&descriptors)).unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .build_transport(true)
        .emit_rerun_if_changed(false)
        .out_dir(into)
        .compile_fds(descriptors)
        .expect("code generation succeeds");
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path: PathBuf = entry.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn generated_code_is_up_to_date() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/generated");
    if std::env::var_os("SWITCHBOARD_REGENERATE").is_some() {
        generate(&committed);
        return;
    }
    let fresh = tempfile::tempdir().unwrap();
    generate(fresh.path());
    let fresh_files = files(fresh.path());
    let committed_files = files(&committed);
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|(name, _)| name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&committed_files), names(&fresh_files), "generated file set differs");
    for ((name, committed), (_, fresh)) in committed_files.iter().zip(&fresh_files) {
        assert!(
            committed == fresh,
            "src/generated/{name} is stale: run `SWITCHBOARD_REGENERATE=1 cargo test -p switchboard-proto --test codegen`"
        );
    }
}
