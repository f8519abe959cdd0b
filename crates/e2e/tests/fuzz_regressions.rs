//! Replays every input kept under fuzz/regressions/ (seeds and crashes `make fuzz` found)
//! through the fuzz targets' bodies, so a fixed crash stays fixed without a fuzzer.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} fails again", path.display());
        n += 1;
    }
    assert!(n > 0, "no inputs under {}", dir.display());
}

#[test]
fn infer_request_regressions() {
    replay("infer_request", framecast_inference::fuzzing::infer_request);
}

#[test]
fn model_config_regressions() {
    replay("model_config", framecast_inference::fuzzing::model_config);
}

#[test]
fn avatar_manifest_regressions() {
    replay(
        "avatar_manifest",
        framecast_compositor::fuzzing::avatar_manifest,
    );
}

#[test]
fn audio_chunks_regressions() {
    replay("audio_chunks", framecast_audio::fuzzing::audio_chunks);
}

#[test]
fn sdp_offer_regressions() {
    replay("sdp_offer", framecast_gateway::fuzzing::sdp_offer);
}

#[test]
fn prepared_file_regressions() {
    replay(
        "prepared_file",
        framecast_compositor::fuzzing::prepared_file,
    );
    framecast_compositor::fuzzing::remove_prepared_fixture();
}
