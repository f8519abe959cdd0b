//! Audio sessions on Render: PCM in, frames out as the audio arrives, both servers real.

use bytes::Bytes;
use framecast_e2e::stack::{open_render, render, stack};
use framecast_e2e::{kserve_client, FRAMES};
use framecast_inference::zoo::{self, Builtin, ZooOptions};
use framecast_proto::compositor::v1::{
    AudioChunk, AudioFormat, ImageFormat, RenderRequest, RenderedFrame, SampleFormat,
};
use framecast_proto::kserve::ModelStatisticsRequest;
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::Code;

const RATE: u32 = 22_050;

/// Speech-like audio: a voiced buzz at 120 Hz, four syllables a second.
fn speechlike(seconds: f64) -> Vec<f32> {
    let n = (RATE as f64 * seconds) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / RATE as f64;
            let env = (std::f64::consts::PI * 4.0 * t).sin().abs();
            let voiced: f64 = (1..10)
                .map(|h| (2.0 * std::f64::consts::PI * 120.0 * h as f64 * t).sin() / h as f64)
                .sum();
            (0.3 * env * voiced) as f32
        })
        .collect()
}

fn s16(samples: &[f32]) -> Bytes {
    samples
        .iter()
        .flat_map(|s| ((s * 32767.0) as i16).to_le_bytes())
        .collect::<Vec<u8>>()
        .into()
}

fn format(sample_format: SampleFormat, sample_rate: u32) -> Option<AudioFormat> {
    Some(AudioFormat {
        sample_format: sample_format as i32,
        sample_rate,
    })
}

/// The first message of a session on `avatar`, carrying `pcm`.
fn opening(avatar: &str, start: u64, pcm: Bytes) -> RenderRequest {
    RenderRequest {
        request_id: format!("talk-{avatar}"),
        avatar_id: avatar.into(),
        start_frame: start,
        audio: Some(AudioChunk {
            format: format(SampleFormat::S16le, RATE),
            pcm,
            end_of_speech: false,
            cancel: false,
        }),
        ..Default::default()
    }
}

fn more(pcm: Bytes, end_of_speech: bool) -> RenderRequest {
    RenderRequest {
        audio: Some(AudioChunk {
            format: None,
            pcm,
            end_of_speech,
            cancel: false,
        }),
        ..Default::default()
    }
}

/// Reads frames until the stream ends; panics on an error.
async fn drain(stream: &mut tonic::Streaming<RenderedFrame>, frames: &mut Vec<RenderedFrame>) {
    while let Some(f) = stream.next().await {
        frames.push(f.expect("render stream"));
    }
}

fn check_session(frames: &[RenderedFrame], start: u64, want: u64) {
    assert_eq!(frames.len() as u64, want, "frames for the audio");
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.frame_index, start + i as u64, "out of order or lost");
        assert_eq!(f.request_id, "talk-small");
        assert_eq!(
            f.background_index as u64,
            ping_pong(f.frame_index),
            "background"
        );
        assert_eq!(
            f.last_in_request,
            i + 1 == frames.len(),
            "last_in_request on frame {i}"
        );
        assert!(!f.image.is_empty());
    }
}

/// The background a frame index plays: the fixture avatars loop their frames ping-pong.
fn ping_pong(i: u64) -> u64 {
    let n = FRAMES as u64;
    let period = 2 * (n - 1);
    let p = i % period;
    if p < n {
        p
    } else {
        period - p
    }
}

/// Frames stream while the speech is still coming (each once its window's audio is in), and
/// end_of_speech brings the frames of the tail: exactly ceil(seconds * fps), in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_follow_the_audio_as_it_arrives_and_the_tail_comes_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let audio = speechlike(3.0);
    let packets: Vec<Bytes> = audio.chunks(441).map(s16).collect();
    let start = 5;
    let (tx, mut stream) =
        open_render(&s.client, opening("small", start, packets[0].clone())).await;
    // 1.5 s of audio: frames whose 200 ms window lies inside it can come now.
    let half = packets.len() / 2;
    for p in &packets[1..half] {
        tx.send(more(p.clone(), false)).await.unwrap();
    }
    let mut frames = Vec::new();
    let early = tokio::time::timeout(Duration::from_secs(60), async {
        while frames.len() < 25 {
            let f = stream
                .next()
                .await
                .expect("stream ended early")
                .expect("frame");
            frames.push(f);
        }
    })
    .await;
    assert!(
        early.is_ok(),
        "only {} frames before the speech ended",
        frames.len()
    );
    assert!(frames.iter().all(|f| !f.last_in_request));
    for (i, p) in packets[half..].iter().enumerate() {
        tx.send(more(p.clone(), half + i + 1 == packets.len()))
            .await
            .unwrap();
    }
    drop(tx);
    drain(&mut stream, &mut frames).await;
    check_session(&frames, start, 75);
}

/// With features = "encoder", each frame hears 16 embeddings around it, and each window is
/// embedded once however many frames read it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoder_avatar_embeds_each_window_once() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let models = tmp.path().join("models");
    let opts = ZooOptions {
        max_batch_size: 8,
        max_queue_delay_us: 1000,
        ..Default::default()
    };
    zoo::write(&models, Builtin::AudioEncoder, &opts).unwrap();
    let avatars = tmp.path().join("avatars");
    framecast_e2e::copy_avatar(
        &avatars,
        "small",
        "small-enc",
        Some("[audio]\ninput = \"audio\"\nfeatures = \"encoder\"\nencoder = \"audio-encoder\"\nstack = 16\n"),
    );
    let audio = speechlike(2.0);
    let mut msgs = vec![opening("small-enc", 0, s16(&audio[..4410]))];
    let rest: Vec<Bytes> = audio[4410..].chunks(2205).map(s16).collect();
    for (i, p) in rest.iter().enumerate() {
        msgs.push(more(p.clone(), i + 1 == rest.len()));
    }
    let frames = render(&s.client, msgs).await.unwrap();
    assert_eq!(frames.len(), 50);
    assert!(frames.last().unwrap().last_in_request);
    let stats = kserve_client(s.inference_server.url())
        .await
        .model_statistics(ModelStatisticsRequest {
            name: "audio-encoder".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.model_stats[0].inference_count, 50,
        "windows embedded (one per frame)"
    );
}

/// A live session: `packets` of `packet_ms` of audio each, sent at real time from `start`
/// (the first opens the session `id` on `avatar`); returns how many frames came back.
async fn live_session(
    client: &framecast_proto::compositor::v1::compositor_client::CompositorClient<
        tonic::transport::Channel,
    >,
    id: String,
    avatar: &str,
    packets: Vec<Bytes>,
    start: tokio::time::Instant,
    packet_ms: u64,
) -> usize {
    tokio::time::sleep_until(start).await;
    let first = RenderRequest {
        request_id: id,
        ..opening(avatar, 0, packets[0].clone())
    };
    let (tx, mut stream) = open_render(client, first).await;
    let sender = tokio::spawn(async move {
        for (k, p) in packets[1..].iter().enumerate() {
            let at = start + Duration::from_millis(packet_ms * (k as u64 + 1));
            tokio::time::sleep_until(at).await;
            tx.send(more(p.clone(), k + 2 == packets.len()))
                .await
                .unwrap();
        }
    });
    let mut frames = Vec::new();
    drain(&mut stream, &mut frames).await;
    sender.await.unwrap();
    frames.len()
}

/// Sessions speaking at once share audio-encoder requests: the compositor's batcher puts the
/// windows of several sessions into one request. The sessions speak in lockstep, a frame's
/// audio (40 ms) every 40 ms, so each asks for one window at a time, together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_of_concurrent_sessions_share_encoder_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let opts = ZooOptions {
        max_batch_size: 8,
        max_queue_delay_us: 1000,
        ..Default::default()
    };
    zoo::write(&tmp.path().join("models"), Builtin::AudioEncoder, &opts).unwrap();
    let avatars = tmp.path().join("avatars");
    let table = "[audio]\ninput = \"audio\"\nfeatures = \"encoder\"\nencoder = \"audio-encoder\"\n";
    framecast_e2e::copy_avatar(&avatars, "small", "enc", Some(table));
    let packets: Vec<Bytes> = speechlike(1.0).chunks(882).map(s16).collect();
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let sessions = (0..4).map(|i| {
        live_session(
            &s.client,
            format!("enc-{i}"),
            "enc",
            packets.clone(),
            start,
            40,
        )
    });
    let counts = futures::future::join_all(sessions).await;
    assert_eq!(counts, [25; 4]);
    let h = &s.metrics.encoder_batch_sessions;
    eprintln!(
        "{} encoder requests, {:.2} sessions each on average",
        h.get_sample_count(),
        h.get_sample_sum() / h.get_sample_count() as f64
    );
    assert!(
        h.get_sample_sum() > h.get_sample_count() as f64,
        "no encoder request held windows of two sessions ({} requests)",
        h.get_sample_count()
    );
}

/// With features = "mel", a Wav2Lip-style model gets each frame's mel window [1, 80, 16]
/// itself; a model whose audio input has another size is refused when the session opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mel_avatar_gets_the_windows_themselves() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let opts = ZooOptions {
        crop: framecast_e2e::CROP as i64,
        max_batch_size: 8,
        max_queue_delay_us: 1000,
    };
    let models = tmp.path().join("models");
    zoo::write_with(
        &models,
        Builtin::TalkingDemo,
        &opts,
        [1, 80, 16],
        framecast_inference::config::Precision::Fp32,
    )
    .unwrap();
    let avatars = tmp.path().join("avatars");
    framecast_e2e::copy_avatar(
        &avatars,
        "small",
        "w2l",
        Some("[audio]\ninput = \"audio\"\nfeatures = \"mel\"\n"),
    );
    let manifest = std::fs::read_to_string(avatars.join("w2l/avatar.toml")).unwrap();
    let manifest = manifest.replace("model = \"passthrough\"", "model = \"talking-demo\"");
    std::fs::write(avatars.join("w2l/avatar.toml"), manifest).unwrap();
    let audio = speechlike(1.0);
    let msgs = vec![
        opening("w2l", 0, s16(&audio[..11_025])),
        more(s16(&audio[11_025..]), true),
    ];
    let frames = render(&s.client, msgs).await.unwrap();
    assert_eq!(frames.len(), 25);
    // The passthrough's audio input is [32, 16, 16]: 8192 values, not a mel window's 1280.
    framecast_e2e::copy_avatar(
        &avatars,
        "small",
        "w2l-wrong",
        Some("[audio]\ninput = \"audio\"\nfeatures = \"mel\"\n"),
    );
    let msgs = vec![opening("w2l-wrong", 0, s16(&audio))];
    let e = render(&s.client, msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("holds 8192 values per frame"),
        "{}",
        e.message()
    );
}

/// A long session (a minute of silence, sent as fast as it is rendered) holds a bounded
/// number of mel frames however long it runs, and none once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_session_holds_bounded_audio() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let silence = s16(&vec![0.0; RATE as usize / 2]);
    let mut msgs = vec![opening("small", 0, silence.clone())];
    for i in 0..119 {
        msgs.push(more(silence.clone(), i == 118));
    }
    let gauge = s.metrics.audio_mel_frames_held.clone();
    let most = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let (seen, watch) = (most.clone(), gauge.clone());
    let sampler = tokio::spawn(async move {
        loop {
            seen.fetch_max(watch.get(), std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let frames = render(&s.client, msgs).await.unwrap();
    sampler.abort();
    assert_eq!(frames.len(), 1500);
    let held_at_end = gauge.get();
    let most = most.load(std::sync::atomic::Ordering::Relaxed);
    assert!(most > 0, "the gauge never moved");
    eprintln!("a 60 s session held at most {most} mel frames");
    assert_eq!(held_at_end, 0, "an ended session still holds mel frames");
    // A half-second packet is 40 mel frames; the window of the next frame adds 16.
    assert!(most <= 80, "a session held {most} mel frames at once");
}

/// Each kind of bad audio ends the stream with a status naming the field; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_audio_gets_precise_statuses() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    framecast_e2e::copy_avatar(&tmp.path().join("avatars"), "small", "mute", None);
    let ok = s16(&speechlike(0.1));
    let with = |f: Option<AudioFormat>, pcm: Bytes| {
        let mut r = opening("small", 0, pcm);
        r.audio.as_mut().unwrap().format = f;
        r
    };
    let nan: Bytes = [0.1f32, f32::NAN]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect::<Vec<u8>>()
        .into();
    let cases: Vec<(&str, Vec<RenderRequest>, Code, &str)> = vec![
        (
            "no format",
            vec![with(None, ok.clone())],
            Code::InvalidArgument,
            "audio.format: required",
        ),
        (
            "unknown format",
            vec![with(format(SampleFormat::Unspecified, RATE), ok.clone())],
            Code::InvalidArgument,
            "audio.format.sample_format",
        ),
        (
            "rate",
            vec![with(format(SampleFormat::S16le, 96_000), ok.clone())],
            Code::InvalidArgument,
            "audio.format.sample_rate",
        ),
        (
            "odd bytes",
            vec![with(format(SampleFormat::S16le, RATE), ok.slice(..3))],
            Code::InvalidArgument,
            "audio.pcm: 3 bytes",
        ),
        (
            "nan",
            vec![with(format(SampleFormat::F32le, RATE), nan)],
            Code::InvalidArgument,
            "audio.pcm: sample 1 is NaN",
        ),
        (
            "too far ahead",
            vec![opening("small", 0, s16(&speechlike(12.0)))],
            Code::ResourceExhausted,
            "--max-audio-ahead-s",
        ),
        (
            "no [audio]",
            vec![opening("mute", 0, ok.clone())],
            Code::FailedPrecondition,
            "has no [audio] table",
        ),
        (
            "conditioning mid-session",
            vec![
                opening("small", 0, ok.clone()),
                framecast_e2e::request("small", 0, 2),
            ],
            Code::InvalidArgument,
            "audio: a request without audio",
        ),
        (
            "frame_count with audio",
            vec![RenderRequest {
                frame_count: 3,
                ..opening("small", 0, ok.clone())
            }],
            Code::InvalidArgument,
            "frame_count, conditioning",
        ),
    ];
    for (what, msgs, code, text) in cases {
        let e = render(&s.client, msgs)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what}: the stream ended without an error"));
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert!(e.message().contains(text), "{what}: {}", e.message());
    }
    // Still serving.
    let frames = render(&s.client, vec![framecast_e2e::request("small", 0, 2)])
        .await
        .unwrap();
    assert_eq!(frames.len(), 2);
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// The demo's promise, measured: `talking-demo` speaking the demo sentence (espeak-ng) opens
/// its mouth with the speech. Per frame, the darkness of the mouth region in the output frame
/// follows the RMS of the audio that drives that frame (its 200 ms window): Pearson r >= 0.7;
/// against the audio one second later, r <= 0.2 (frames that ignored the audio would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_lips_follow_the_speech() {
    use framecast_compositor::demo::{self, DemoOptions};
    use framecast_compositor::inference::{ClientOptions, InferenceClient};
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    let crop = 64;
    let opts = ZooOptions {
        crop,
        max_batch_size: 8,
        max_queue_delay_us: 1000,
    };
    zoo::write(&models, Builtin::TalkingDemo, &opts).unwrap();
    let avatars = tmp.path().join("avatars");
    let avatar = DemoOptions {
        id: "talker".into(),
        width: 320,
        height: 180,
        frames: 6,
        fps: 25.0,
        crop_size: crop as u32,
        model: "talking-demo".into(),
    };
    let dir = demo::write_demo(&avatars, &avatar).unwrap();
    let inference = framecast_e2e::spawn_inference(&models, Default::default()).await;
    let pool =
        InferenceClient::connect_lazy(&[inference.url()], &ClientOptions::default()).unwrap();
    let compositor = framecast_e2e::spawn_compositor(&avatars, pool, 8, Default::default()).await;
    let client = framecast_proto::compositor::v1::compositor_client::CompositorClient::connect(
        compositor.url(),
    )
    .await
    .unwrap();

    let (rate, samples) =
        framecast_bench::demo::speech(framecast_bench::demo::DEFAULT_TEXT, None, tmp.path())
            .unwrap();
    let messages =
        framecast_bench::demo::session("lips", "talker", rate, &samples, rate as usize / 50);
    let frames = render(&client, messages).await.unwrap();
    let seconds = samples.len() as f64 / rate as f64;
    assert_eq!(frames.len(), (seconds * 25.0).ceil() as usize);

    let boxes: Vec<[u32; 4]> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("boxes.json")).unwrap()).unwrap();
    let darkness: Vec<f64> = frames
        .iter()
        .map(|f| {
            let img = image::load_from_memory(&f.image).unwrap().into_rgb8();
            let [x, y, w, h] = boxes[f.background_index as usize];
            // talking-demo draws the mouth at (0.5, 0.74) of the crop, 0.3 wide.
            let (x0, x1) = (x + w * 40 / 100, x + w * 60 / 100);
            let (y0, y1) = (y + h * 70 / 100, y + h * 78 / 100);
            let mut sum = 0.0;
            for py in y0..y1 {
                for px in x0..x1 {
                    let p = img.get_pixel(px, py);
                    sum += 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64;
                }
            }
            255.0 - sum / ((x1 - x0) * (y1 - y0)) as f64
        })
        .collect();
    let rms: Vec<f64> = (0..frames.len() + 25)
        .map(|k| {
            let t0 = framecast_audio::window::start(k as u64, 25.0) as f64 / 80.0;
            let a = ((t0 * rate as f64) as usize).min(samples.len());
            let b = (((t0 + 0.2) * rate as f64) as usize).min(samples.len());
            let s = &samples[a..b];
            (s.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / s.len().max(1) as f64).sqrt()
        })
        .collect();
    let n = frames.len();
    let r = pearson(&darkness, &rms[..n]);
    let shifted = pearson(&darkness[..n - 25], &rms[25..n]);
    eprintln!("mouth darkness vs audio RMS over {n} frames: r = {r:.3}; audio shifted by 1 s: r = {shifted:.3}");
    assert!(r >= 0.7, "lips do not follow the speech: r = {r:.3}");
    assert!(
        shifted <= 0.2,
        "lips follow audio one second away: r = {shifted:.3}"
    );
}

/// Silence in a session makes idle frames: each is the avatar's prepared background JPEG
/// itself (no inference call, no encode), marked idle in its timings and counted; the speech
/// around it is rendered as usual, and no frame is lost at the seams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_in_a_session_streams_the_prepared_background() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let mut audio = speechlike(1.0);
    audio.extend(std::iter::repeat_n(0.0, (RATE as f64 * 1.6) as usize));
    audio.extend(speechlike(1.0));
    let packets: Vec<Bytes> = audio.chunks(2205).map(s16).collect();
    let mut msgs = vec![opening("small", 0, packets[0].clone())];
    for (i, p) in packets[1..].iter().enumerate() {
        msgs.push(more(p.clone(), i + 2 == packets.len()));
    }
    let frames = render(&s.client, msgs).await.unwrap();
    check_session(&frames, 0, 90);
    let avatar =
        framecast_compositor::avatar::Avatar::load(&tmp.path().join("avatars/small")).unwrap();
    let idle: Vec<&RenderedFrame> = frames
        .iter()
        .filter(|f| f.timings.as_ref().unwrap().idle)
        .collect();
    // 1.6 s of silence holds about 35 frames whose 200 ms window is all silent.
    assert!(
        (25..=42).contains(&idle.len()),
        "{} idle frames in 1.6 s of silence",
        idle.len()
    );
    for f in &idle {
        let t = f.timings.as_ref().unwrap();
        assert_eq!((t.inference_us, t.blend_us), (0, 0));
        let bg = &avatar.frames[f.background_index as usize];
        assert!(
            f.image == bg.jpeg,
            "idle frame {} is not the prepared background",
            f.frame_index
        );
        assert!(
            (25..=66).contains(&f.frame_index),
            "frame {} is idle outside the silence",
            f.frame_index
        );
    }
    // The speech on both sides is rendered.
    assert!(frames[..20]
        .iter()
        .all(|f| !f.timings.as_ref().unwrap().idle));
    assert!(frames[72..]
        .iter()
        .all(|f| !f.timings.as_ref().unwrap().idle));
    assert_eq!(s.metrics.idle_frames.get(), idle.len() as u64);
}

/// A request marked idle renders its frames without the model; conditioning with it is
/// refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_marked_idle_skips_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let idle = RenderRequest {
        idle: true,
        conditioning: vec![],
        ..framecast_e2e::request("small", 2, 5)
    };
    let frames = render(&s.client, vec![idle]).await.unwrap();
    assert_eq!(frames.len(), 5);
    let avatar =
        framecast_compositor::avatar::Avatar::load(&tmp.path().join("avatars/small")).unwrap();
    for f in &frames {
        assert!(f.timings.as_ref().unwrap().idle);
        assert!(f.image == avatar.frames[f.background_index as usize].jpeg);
    }
    assert!(frames.last().unwrap().last_in_request);
    let stats = kserve_client(s.inference_server.url())
        .await
        .model_statistics(ModelStatisticsRequest {
            name: String::new(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let inferred: u64 = stats.model_stats.iter().map(|m| m.inference_count).sum();
    assert_eq!(inferred, 0, "idle frames must not reach the model");
    let bad = RenderRequest {
        idle: true,
        ..framecast_e2e::request("small", 0, 5)
    };
    let e = render(&s.client, vec![bad]).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("conditioning"), "{}", e.message());
}

/// An audio session asking for raw I420 gets every frame raw, speaking and idle alike; a
/// later message may not change the format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audio_session_can_take_raw_i420_frames() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let mut audio = speechlike(0.6);
    audio.extend(std::iter::repeat_n(0.0, (RATE as f64 * 0.8) as usize));
    let packets: Vec<Bytes> = audio.chunks(2205).map(s16).collect();
    let mut first = opening("small", 0, packets[0].clone());
    first.frame_format = ImageFormat::I420 as i32;
    let mut msgs = vec![first];
    for (i, p) in packets[1..].iter().enumerate() {
        msgs.push(more(p.clone(), i + 2 == packets.len()));
    }
    let frames = render(&s.client, msgs.clone()).await.unwrap();
    assert!(frames.len() >= 30, "{} frames", frames.len());
    let (w, h) = (frames[0].width as usize, frames[0].height as usize);
    let size = w * h + 2 * w.div_ceil(2) * h.div_ceil(2);
    assert!(frames.iter().any(|f| f.timings.as_ref().unwrap().idle));
    for f in &frames {
        assert_eq!(
            f.format,
            ImageFormat::I420 as i32,
            "frame {}",
            f.frame_index
        );
        assert_eq!(f.image.len(), size, "frame {}", f.frame_index);
    }
    msgs[1].frame_format = ImageFormat::Jpeg as i32;
    let e = render(&s.client, msgs).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("frame_format"), "{}", e.message());
}

/// With idle_frame_format JPEG, an I420 audio session's idle frames come as their prepared
/// JPEG (format says so; they decode to the avatar's size, and decoded as the gateway does
/// they equal the I420 frame the compositor sends for them otherwise), its talking frames
/// stay I420; a value that is no ImageFormat is refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_frames_can_come_as_their_prepared_jpeg() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let mut audio = speechlike(0.6);
    audio.extend(std::iter::repeat_n(0.0, (RATE as f64 * 0.8) as usize));
    let packets: Vec<Bytes> = audio.chunks(2205).map(s16).collect();
    let session = |idle_format: ImageFormat| {
        let mut first = opening("small", 0, packets[0].clone());
        first.frame_format = ImageFormat::I420 as i32;
        first.idle_frame_format = idle_format as i32;
        let mut msgs = vec![first];
        for (i, p) in packets[1..].iter().enumerate() {
            msgs.push(more(p.clone(), i + 2 == packets.len()));
        }
        msgs
    };
    let frames = render(&s.client, session(ImageFormat::Jpeg)).await.unwrap();
    let raw = render(&s.client, session(ImageFormat::Unspecified))
        .await
        .unwrap();
    assert_eq!(frames.len(), raw.len());
    let (w, h) = (frames[0].width, frames[0].height);
    let mut idle = 0;
    for (f, r) in frames.iter().zip(&raw) {
        if f.timings.as_ref().unwrap().idle {
            idle += 1;
            assert_eq!(
                f.format,
                ImageFormat::Jpeg as i32,
                "idle frame {}",
                f.frame_index
            );
            assert_eq!(&f.image[..2], &[0xff, 0xd8], "a JPEG");
            let decoded = framecast_compositor::raw_frame::from_jpeg(&f.image, w, h).unwrap();
            let off = decoded
                .iter()
                .zip(r.image.iter())
                .map(|(a, b)| (*a as i32 - *b as i32).unsigned_abs())
                .max()
                .unwrap();
            // The compositor's own I420 keeps the face region as prepared (not through the JPEG).
            assert!(
                off <= 40,
                "idle frame {} off by {off} from the I420 one",
                f.frame_index
            );
        } else {
            assert_eq!(
                f.format,
                ImageFormat::I420 as i32,
                "frame {}",
                f.frame_index
            );
        }
    }
    assert!(idle > 5, "{idle} idle frames");
    let mut bad = session(ImageFormat::Jpeg);
    bad[0].idle_frame_format = 7;
    let e = render(&s.client, bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("idle_frame_format"), "{}", e.message());
}

/// Only progress keeps a stream: one that opens a session and then sends empty audio packets
/// (keep-alives that render nothing) is ended at the idle timeout however often it sends
/// them, and its place goes to the next client; one streaming real audio for longer than
/// the timeout is never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_keep_alive_packets_do_not_hold_a_stream() {
    use framecast_e2e::stack::{stack_with, Opts};
    let tmp = tempfile::tempdir().unwrap();
    let s = stack_with(
        tmp.path(),
        8,
        Opts {
            max_streams: 1,
            idle_timeout: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    let (tx, mut stream) = open_render(&s.client, opening("small", 0, Bytes::new())).await;
    let keep_alive = tokio::spawn(async move {
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tx.send(more(Bytes::new(), false)).await.is_err() {
                return;
            }
        }
    });
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(4), stream.next())
        .await
        .expect("the stream was not ended while it sent keep-alives");
    let e = ended.expect("an error, not the end").unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(e.message().contains("idle"), "{}", e.message());
    assert!(started.elapsed() < Duration::from_secs(3));
    keep_alive.abort();
    // Real audio at real time for twice the timeout keeps its stream, to the last frame.
    let audio = speechlike(2.0);
    let packets: Vec<Bytes> = audio.chunks(RATE as usize / 10).map(s16).collect();
    // Refused while the old place is still being given back: tried again.
    let (tx, mut stream) = framecast_e2e::stack::poll_until(
        Duration::from_secs(5),
        || try_open(&s.client, opening("small", 0, packets[0].clone())),
        Result::is_ok,
    )
    .await
    .expect("the keep-alive stream's place was never given back");
    let sender = tokio::spawn(async move {
        for (i, p) in packets.iter().enumerate().skip(1) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            tx.send(more(p.clone(), i + 1 == packets.len()))
                .await
                .unwrap();
        }
    });
    let mut frames = Vec::new();
    drain(&mut stream, &mut frames).await;
    sender.await.unwrap();
    assert!(
        frames.len() >= 45,
        "{} frames for 2 s of audio",
        frames.len()
    );
}

/// One client cannot hold every stream: past its share it is refused naming the flag, and a
/// client at another address still gets one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_has_its_share_of_streams() {
    use framecast_e2e::stack::{stack_with, Opts};
    let tmp = tempfile::tempdir().unwrap();
    let s = stack_with(
        tmp.path(),
        8,
        Opts {
            max_streams: 3,
            streams_per_client: Some(2),
            ..Default::default()
        },
    )
    .await;
    let first = || opening("small", 0, Bytes::new());
    let _a = open_render(&s.client, first()).await;
    let _b = open_render(&s.client, first()).await;
    let e = try_open(&s.client, first()).await.err().unwrap();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("--max-streams-per-client"),
        "{}",
        e.message()
    );
    let url = format!("http://{}", s.compositor_server.addr);
    let other = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .local_address(Some([127, 0, 0, 2].into()))
        .connect()
        .await
        .unwrap();
    let other = framecast_proto::compositor::v1::compositor_client::CompositorClient::new(other);
    let (_tx, mut admitted) = open_render(&other, first()).await;
    let nothing = tokio::time::timeout(Duration::from_millis(500), admitted.next()).await;
    assert!(nothing.is_err(), "another address was refused: {nothing:?}");
}

/// A Render stream opened with `first`, or the status it was refused with.
async fn try_open(
    client: &framecast_proto::compositor::v1::compositor_client::CompositorClient<
        tonic::transport::Channel,
    >,
    first: RenderRequest,
) -> Result<
    (
        tokio::sync::mpsc::Sender<RenderRequest>,
        tonic::Streaming<RenderedFrame>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let stream = client
        .clone()
        .render(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// The end of a session is always marked: end_of_speech after no samples at all still gives
/// one frame with last_in_request (before, none came and the client waited for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_of_speech_without_samples_still_marks_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let (tx, mut stream) = open_render(&s.client, opening("small", 3, Bytes::new())).await;
    tx.send(more(Bytes::new(), true)).await.unwrap();
    drop(tx);
    let mut frames = Vec::new();
    drain(&mut stream, &mut frames).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert!(frames[0].last_in_request);
    assert_eq!(frames[0].frame_index, 3);
}

/// A session starting at the last frame index is told that start_frame is too high (it
/// sent no frame_count to blame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_at_the_last_frame_index_is_told_start_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let first = opening("small", u64::MAX, s16(&speechlike(0.5)));
    let (tx, mut stream) = open_render(&s.client, first).await;
    tx.send(more(Bytes::new(), true)).await.unwrap();
    let e = loop {
        match stream.next().await {
            Some(Ok(_)) => continue,
            Some(Err(e)) => break e,
            None => panic!("the stream ended without an error"),
        }
    };
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().starts_with("start_frame") && !e.message().contains("frame_count"),
        "{}",
        e.message()
    );
}

/// A cancel drops the speech received and not yet rendered: every frame after those already
/// sent renders silent (idle, the mouth closed) although its window held speech, where
/// without the cancel the same frame talks; the indices go on without a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_silences_the_speech_not_yet_rendered() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let speech = s16(&speechlike(1.0));
    let silence = s16(&vec![0.0; RATE as usize / 2]);
    let mut firsts = Vec::new();
    for cancel in [false, true] {
        let (tx, mut stream) = open_render(&s.client, opening("small", 0, speech.clone())).await;
        // Every frame whose window the speech completes; the last few wait for more audio.
        let mut frames = Vec::new();
        while let Ok(Some(f)) =
            tokio::time::timeout(Duration::from_millis(700), stream.next()).await
        {
            frames.push(f.unwrap());
        }
        let before = frames.len();
        let mut next = more(silence.clone(), true);
        next.audio.as_mut().unwrap().cancel = cancel;
        tx.send(next).await.unwrap();
        drop(tx);
        drain(&mut stream, &mut frames).await;
        for (i, f) in frames.iter().enumerate() {
            assert_eq!(f.frame_index, i as u64, "a gap or a repeat");
        }
        let idle = |f: &RenderedFrame| f.timings.as_ref().unwrap().idle;
        assert!(
            frames[..before].iter().all(|f| !idle(f)),
            "speech rendered idle"
        );
        if cancel {
            assert!(
                frames[before..].iter().all(idle),
                "a frame after the cancel talks: {:?}",
                frames[before..].iter().map(idle).collect::<Vec<_>>()
            );
        }
        firsts.push(idle(&frames[before]));
    }
    assert_eq!(
        firsts,
        [false, true],
        "the frame after the cut talks only without the cancel"
    );
}

/// Live sessions (20 ms of audio every 20 ms, each at its own phase of the frame period)
/// share the face model's forward passes through the compositor's frame clock (here set to
/// 40 ms: its `auto` default leaves it off for a model served on a CPU, as this one is):
/// the inference service runs several sessions' frames per pass (without the clock, nearly
/// every pass held one frame: docs/performance.md), and every session gets all its frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_share_forward_passes_on_the_frame_clock() {
    use framecast_compositor::render::FrameTick;
    use framecast_e2e::stack::{stack_with, Opts};
    let tmp = tempfile::tempdir().unwrap();
    let opts = Opts {
        frame_tick: FrameTick::Fixed(Duration::from_millis(40)),
        ..Default::default()
    };
    let s = stack_with(tmp.path(), 8, opts).await;
    let info = s.inference.model_info("passthrough").await.unwrap();
    assert!(!info.on_gpu, "the CPU replica's ModelConfig says KIND_CPU");
    let packets: Vec<Bytes> = speechlike(2.0).chunks(441).map(s16).collect();
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let sessions = (0..4u64).map(|i| {
        let phase = start + Duration::from_millis(10 * i);
        live_session(
            &s.client,
            format!("live-{i}"),
            "small",
            packets.clone(),
            phase,
            20,
        )
    });
    let counts = futures::future::join_all(sessions).await;
    assert_eq!(counts, [50; 4], "frames per session");
    let stats = kserve_client(s.inference_server.url())
        .await
        .model_statistics(ModelStatisticsRequest {
            name: "passthrough".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let m = &stats.model_stats[0];
    let per_pass = m.inference_count as f64 / m.execution_count.max(1) as f64;
    let h = &s.metrics.face_batch_frames;
    let sent = h.get_sample_sum() / h.get_sample_count().max(1) as f64;
    eprintln!(
        "{} frames in {} passes: {per_pass:.2} a pass; the clock sent {sent:.2} frames a request",
        m.inference_count, m.execution_count
    );
    assert!(
        per_pass >= 2.0,
        "{per_pass:.2} frames per forward pass for 4 live sessions"
    );
    let waited = &s.metrics.frame_clock_wait_seconds;
    assert!(waited.get_sample_count() > 0);
}
