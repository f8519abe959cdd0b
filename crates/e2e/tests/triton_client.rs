//! Triton's own Python client against the real server (scripts/triton_client_check.py, run
//! with the reference venv scripts/setup.sh prepares): health, metadata, ModelConfig, infer,
//! streaming, statistics, unload/load and system shared memory, as existing Triton users
//! call them.

use framecast_e2e::{spawn_inference, write_fixtures, CROP};
use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_works_unchanged() {
    let python = std::env::var("FRAMECAST_REFERENCE_PYTHON").expect(
        "FRAMECAST_REFERENCE_PYTHON is not set: run through `make test`, or eval \"$(scripts/setup.sh)\" first (it installs tritonclient)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let (models, _) = write_fixtures(tmp.path(), 1000);
    let server = spawn_inference(&models, Default::default()).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/triton_client_check.py");
    let addr = server.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([addr.as_str(), "passthrough", &CROP.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "tritonclient check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok: shm: unregistered"), "{stdout}");
}
