//! Models served as they are: Wav2Lip's generator architecture, traced as a user exports it
//! (mel window first; the face as floats in [0, 1], BGR, the masked crop first), served with
//! a `config.toml` that says so, gives what Wav2Lip's own inference script would get from
//! the same module, and renders a speech session end to end through the compositor.

use bytes::Bytes;
use framecast_e2e::stack::{render, stack, Stack};
use framecast_e2e::{kserve_client, spawn_inference};
use framecast_inference::zoo::{self, wav2lip, Builtin, ZooOptions};
use framecast_proto::kserve::model_infer_request::InferInputTensor;
use framecast_proto::kserve::ModelInferRequest;
use framecast_proto::tensor::DataType;
use std::path::Path;
use tch::{CModule, Device, Kind, Tensor};

const S: i64 = wav2lip::CROP;

fn opts() -> ZooOptions {
    ZooOptions {
        max_batch_size: 8,
        max_queue_delay_us: 1000,
        ..Default::default()
    }
}

/// The served model's answer is the module's own, run as Wav2Lip's `inference.py` runs it:
/// the face divided by 255 in BGR order with the masked crop first, the mel window as it is,
/// the output's BGR floats times 255. (The server converts u8 RGB to that and back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_wav2lip_answers_as_its_own_script_would() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = zoo::write(tmp.path(), Builtin::Wav2LipArch, &opts()).unwrap();
    let running = spawn_inference(tmp.path(), Default::default()).await;
    let mut client = kserve_client(running.url()).await;
    let face: Vec<u8> = (0..6 * S * S)
        .map(|i| ((i * 7919 + i / 96 * 31) % 251) as u8)
        .collect();
    let mel: Vec<f32> = (0..80 * 16)
        .map(|i| ((i as f32 * 0.37).sin() * 3.0) - 1.0)
        .collect();
    let request = ModelInferRequest {
        model_name: "wav2lip-arch".into(),
        inputs: vec![
            InferInputTensor::new("mel", DataType::F32, vec![1, 1, 80, 16]),
            InferInputTensor::new("face", DataType::U8, vec![1, 6, S, S]),
        ],
        raw_input_contents: vec![
            framecast_proto::tensor::encode(&mel),
            Bytes::from(face.clone()),
        ],
        ..Default::default()
    };
    let resp = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(resp.outputs[0].name, "output");
    assert_eq!(resp.outputs[0].shape, vec![1, 3, S, S]);
    let served = resp.raw_output_contents[0].to_vec();

    // Wav2Lip's script, in-process on the same TorchScript file.
    let module = CModule::load_on_device(dir.join("model.pt"), Device::Cpu).unwrap();
    let bgr = |t: Tensor| {
        let s = t.size();
        t.reshape([s[0], s[1] / 3, 3, s[2], s[3]])
            .flip([2])
            .reshape([s[0], s[1], s[2], s[3]])
    };
    let face_in = bgr(Tensor::from_slice(&face)
        .reshape([1, 6, S, S])
        .to_kind(Kind::Float)
        / 255.0);
    let mel_in = Tensor::from_slice(&mel).reshape([1, 1, 80, 16]);
    let out = tch::no_grad(|| module.forward_ts(&[mel_in, face_in]).unwrap());
    let out = (bgr(out).clamp(0.0, 1.0) * 255.0)
        .round()
        .to_kind(Kind::Uint8)
        .flatten(0, -1);
    let expected: Vec<u8> = Vec::try_from(out).unwrap();
    assert_eq!(served.len(), expected.len());
    let worst = served
        .iter()
        .zip(&expected)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "served differs from the script by up to {worst}"
    );
    // The channels really are reordered: the same answer read as RGB is another image.
    let swapped: Vec<u8> = {
        let plane = (S * S) as usize;
        [2, 1, 0]
            .iter()
            .flat_map(|&c| served[c * plane..(c + 1) * plane].to_vec())
            .collect()
    };
    assert_ne!(
        swapped, expected,
        "a colour-symmetric answer proves nothing"
    );
}

/// `avatars/small` copied as `id` for `model`: its manifest's lines replaced as `edits` says
/// and `audio` as its `[audio]` table.
fn avatar_for(avatars: &Path, id: &str, audio: &str, edits: &[(&str, &str)]) {
    framecast_e2e::copy_avatar(avatars, "small", id, Some(audio));
    let path = avatars.join(id).join("avatar.toml");
    let mut manifest = std::fs::read_to_string(&path).unwrap();
    for (from, to) in edits {
        assert!(manifest.contains(from), "{from} not in {manifest}");
        manifest = manifest.replace(from, to);
    }
    std::fs::write(&path, manifest).unwrap();
}

/// Speaks `seconds` of a voiced buzz (120 Hz and its harmonics, four syllables a second,
/// 16 kHz) to avatar `id` and checks the session: every frame in order, most of them with
/// the model's face pasted (not the prepared background), the rest idle.
async fn speak(s: &Stack, avatars: &Path, id: &str, seconds: f64) {
    let msgs = vec![framecast_e2e::speech_session(id, seconds)];
    let frames = render(&s.client, msgs).await.unwrap();
    let want = (seconds * 25.0).ceil() as usize;
    assert_eq!(frames.len(), want);
    // An idle frame is the prepared background itself; a talking one has the face pasted.
    let avatar = framecast_compositor::avatar::Avatar::load(&avatars.join(id)).unwrap();
    let mut talking = 0;
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.frame_index, i as u64);
        if f.image != avatar.frames[f.background_index as usize].jpeg {
            talking += 1;
        }
    }
    let idle = frames
        .iter()
        .filter(|f| f.timings.as_ref().is_some_and(|t| t.idle))
        .count();
    assert!(
        talking * 5 >= want * 3 && idle + talking == want,
        "{id}: only {talking} of {want} frames carry the model's face ({idle} idle)"
    );
}

/// An avatar made for Wav2Lip (96 px crops, the masked crop first, mel windows) renders a
/// speech session end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wav2lip_avatar_renders_a_speech_session() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    zoo::write(&tmp.path().join("models"), Builtin::Wav2LipArch, &opts()).unwrap();
    let avatars = tmp.path().join("avatars");
    let crop = format!("crop_size = {}", framecast_e2e::CROP);
    avatar_for(
        &avatars,
        "w2l",
        "[audio]\ninput = \"mel\"\nfeatures = \"mel\"\n",
        &[
            ("model = \"passthrough\"", "model = \"wav2lip-arch\""),
            (&crop, "crop_size = 96"),
            (
                "channel_order = [\"reference\", \"masked\"]",
                "channel_order = [\"masked\", \"reference\"]",
            ),
        ],
    );
    speak(&s, &avatars, "w2l", 1.0).await;
}

/// A SyncTalk_2D-style avatar (the UNet-328 shape of `lipsync-ref` at 320 px, hearing 16
/// embeddings of the audio encoder around each frame) renders a speech session end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synctalk_style_avatar_renders_a_speech_session() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let models = tmp.path().join("models");
    zoo::write(&models, Builtin::LipsyncRef, &opts()).unwrap();
    zoo::write(&models, Builtin::AudioEncoder, &opts()).unwrap();
    let avatars = tmp.path().join("avatars");
    let crop = format!("crop_size = {}", framecast_e2e::CROP);
    avatar_for(
        &avatars,
        "st",
        "[audio]\ninput = \"audio\"\nfeatures = \"encoder\"\nencoder = \"audio-encoder\"\nstack = 16\n",
        &[
            ("model = \"passthrough\"", "model = \"lipsync-ref\""),
            (&crop, "crop_size = 320"),
        ],
    );
    // Half a second: lipsync-ref takes about half a second a frame on this CPU.
    speak(&s, &avatars, "st", 0.5).await;
}
