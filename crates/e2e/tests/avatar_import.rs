//! `avatar import` on a real face: scikit-image's astronaut photograph (NASA, public domain;
//! `scripts/setup.sh` takes it from the scikit-image wheel) made into short videos with known
//! motion (a shift and a zoom every frame), encoded by ffmpeg as H.264/MP4 and VP9/WebM. The
//! imported boxes must match the known ones, the avatar must render a speech session, and
//! bad videos must be refused by name with nothing written.

use framecast_compositor::face_detect::{Cascade, Face, DEFAULT_CASCADE};
use framecast_compositor::import::{import, ImportOptions, Progress};
use framecast_compositor::manifest::{self, Channel, FaceBox};
use framecast_e2e::stack::{render, stack};
use std::path::{Path, PathBuf};
use std::process::Command;

const SIDE: u32 = 320;
const FRAMES: u32 = 40;

fn astronaut() -> image::RgbImage {
    let path = std::env::var("FRAMECAST_ASTRONAUT")
        .expect("FRAMECAST_ASTRONAUT: run the tests through `make test` (scripts/setup.sh)");
    image::open(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .to_rgb8()
}

/// Frame `k`'s window on the photograph: (x, y, side), drifting and zooming in.
fn window(k: u32) -> (f64, f64, f64) {
    (
        20.0 + 2.0 * k as f64,
        10.0 + 1.5 * k as f64,
        400.0 - 3.0 * k as f64,
    )
}

/// The video `name` (its extension picks the container) of the windows, and each frame's
/// known face box: the photograph's face moved and scaled as its window is.
fn known_motion_video(dir: &Path, name: &str, codec: &[&str]) -> (PathBuf, Vec<[f64; 4]>) {
    let photo = astronaut();
    let frames = dir.join(format!("{name}-frames"));
    std::fs::create_dir_all(&frames).unwrap();
    for k in 0..FRAMES {
        let (x, y, side) = window(k);
        let crop = image::imageops::crop_imm(&photo, x as u32, y as u32, side as u32, side as u32)
            .to_image();
        let frame =
            image::imageops::resize(&crop, SIDE, SIDE, image::imageops::FilterType::Triangle);
        frame.save(frames.join(format!("{k:04}.png"))).unwrap();
    }
    let video = dir.join(name);
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-framerate", "25", "-i"])
        .arg(frames.join("%04d.png"))
        .args(codec)
        .arg(&video)
        .output()
        .expect("ffmpeg (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The face in the photograph itself, as the importer's detector finds it.
    let cascade = Cascade::load(Path::new(DEFAULT_CASCADE)).unwrap();
    let gray = image::imageops::grayscale(&photo);
    let faces = cascade.detect(gray.as_raw(), 512, 512, 1.1, 5, 40);
    let f = faces
        .iter()
        .max_by_key(|f| f.hits)
        .expect("the astronaut's face");
    // OpenCV's own detectMultiScale gives [177, 66, 95, 95] on this photograph.
    let opencv = Face {
        x: 177,
        y: 66,
        w: 95,
        h: 95,
        hits: 0,
    };
    assert!(
        iou(&as_box(f), &as_box(&opencv)) >= 0.9,
        "{f:?} against OpenCV's"
    );
    let known = (0..FRAMES)
        .map(|k| {
            let (x, y, side) = window(k);
            let s = SIDE as f64 / side;
            [
                (f.x as f64 - x) * s,
                (f.y as f64 - y) * s,
                f.w as f64 * s,
                f.h as f64 * s,
            ]
        })
        .collect();
    (video, known)
}

fn as_box(f: &Face) -> [f64; 4] {
    [f.x as f64, f.y as f64, f.w as f64, f.h as f64]
}

fn iou(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let w = (a[0] + a[2]).min(b[0] + b[2]) - a[0].max(b[0]);
    let h = (a[1] + a[3]).min(b[1] + b[3]) - a[1].max(b[1]);
    let inter = w.max(0.0) * h.max(0.0);
    inter / (a[2] * a[3] + b[2] * b[3] - inter)
}

fn options(video: &Path, root: &Path, id: &str) -> ImportOptions {
    ImportOptions {
        video: video.to_path_buf(),
        root: root.to_path_buf(),
        id: id.to_string(),
        model: "passthrough".into(),
        crop_size: framecast_e2e::CROP,
        channel_order: vec![Channel::Reference, Channel::Masked],
        audio: Some("[audio]\ninput = \"audio\"\nfeatures = \"energy\"\n".into()),
        pads: [0, 0, 0, 0],
        smooth: 5,
        trim: None,
        max_frames: 3000,
        cascade: DEFAULT_CASCADE.into(),
        min_face: 0,
        force: false,
    }
}

/// Each container's import finds the moving, zooming face on every frame (IoU >= 0.8 with
/// the known box), reports its progress, and the avatar renders a speech session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_of_a_face_becomes_an_avatar_that_speaks() {
    let tmp = tempfile::tempdir().unwrap();
    let s = stack(tmp.path(), 8).await;
    let avatars = tmp.path().join("avatars");
    for (name, codec) in [
        (
            "face.mp4",
            &[
                "-threads", "1", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18",
            ][..],
        ),
        (
            "face.webm",
            &[
                "-threads",
                "1",
                "-c:v",
                "libvpx-vp9",
                "-b:v",
                "2M",
                "-pix_fmt",
                "yuv420p",
            ][..],
        ),
    ] {
        let (video, known) = known_motion_video(tmp.path(), name, codec);
        let id = name.replace('.', "-");
        let mut events = Vec::new();
        let dir = import(&options(&video, &avatars, &id), |p| events.push(p)).unwrap();
        assert!(
            matches!(
                events.first(),
                Some(Progress::Probed {
                    width: SIDE,
                    height: SIDE,
                    frames: 40,
                    ..
                })
            ),
            "{events:?}"
        );
        assert!(
            events.contains(&Progress::Detected { done: 40, of: 40 }),
            "{events:?}"
        );
        let boxes: Vec<FaceBox> = manifest::load_boxes(&dir).unwrap();
        assert_eq!(boxes.len(), FRAMES as usize);
        let ious: Vec<f64> = boxes
            .iter()
            .zip(&known)
            .map(|(b, k)| iou(&[b.x as f64, b.y as f64, b.w as f64, b.h as f64], k))
            .collect();
        let (min, mean) = (
            ious.iter().cloned().fold(1.0, f64::min),
            ious.iter().sum::<f64>() / ious.len() as f64,
        );
        eprintln!("{name}: IoU with the known boxes: min {min:.3}, mean {mean:.3}");
        assert!(min >= 0.8, "{name}: IoU per frame {ious:?}");
        // Complete: it loads from its prepared file, and nothing was left beside it.
        let avatar = framecast_compositor::avatar::Avatar::load(&dir).unwrap();
        assert_eq!(
            avatar.source,
            framecast_compositor::avatar::Source::PreparedFile
        );
        assert_eq!((avatar.manifest.width, avatar.manifest.fps), (SIDE, 25.0));
        // --trim: frames 5..15 only (ffmpeg stopped before the end is no failure).
        let trimmed = ImportOptions {
            trim: Some((5, 15)),
            ..options(&video, &avatars, &format!("{id}-trimmed"))
        };
        let dir = import(&trimmed, |_| {}).unwrap();
        let boxes: Vec<FaceBox> = manifest::load_boxes(&dir).unwrap();
        assert_eq!(boxes.len(), 10, "{name} trimmed");
        for (b, k) in boxes.iter().zip(&known[5..15]) {
            let iou = iou(&[b.x as f64, b.y as f64, b.w as f64, b.h as f64], k);
            assert!(iou >= 0.8, "{name} trimmed: IoU {iou}");
        }
    }
    let leftovers: Vec<_> = std::fs::read_dir(&avatars)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".import"))
        .collect();
    assert!(leftovers.is_empty());
    // The imported avatar speaks.
    let frames = render(
        &s.client,
        vec![framecast_e2e::speech_session("face-mp4", 1.0)],
    )
    .await
    .unwrap();
    assert_eq!(frames.len(), 25);
    assert!(frames
        .iter()
        .enumerate()
        .all(|(i, f)| f.frame_index == i as u64));
}

/// Bad videos and limits are refused by name, and nothing is written for them.
#[test]
fn bad_videos_are_refused_by_name_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("avatars");
    let err = |video: &Path, edit: &dyn Fn(&mut ImportOptions)| {
        let mut o = options(video, &root, "x");
        edit(&mut o);
        import(&o, |_| {}).unwrap_err()
    };
    let empty = tmp.path().join("empty.mp4");
    std::fs::write(&empty, b"").unwrap();
    assert!(err(&empty, &|_| {}).contains("the file is empty"));
    assert!(err(tmp.path(), &|_| {}).contains("not a file"));
    let garbage = tmp.path().join("garbage.mp4");
    std::fs::write(&garbage, vec![0x5a; 4096]).unwrap();
    let e = err(&garbage, &|_| {});
    assert!(e.contains("not a video ffmpeg can read"), "{e}");
    // One second of grey: no face anywhere.
    let grey = tmp.path().join("grey.mp4");
    let out = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "color=c=gray:s=320x240:d=1:r=25",
        ])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(&grey)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = err(&grey, &|_| {});
    assert!(e.contains("no face in frames 0..24"), "{e}");
    let e = err(&grey, &|o| o.max_frames = 10);
    assert!(e.contains("--max-frames is 10"), "{e}");
    let e = err(&grey, &|o| o.id = "../x".into());
    assert!(e.contains("--id"), "{e}");
    let e = err(&grey, &|o| o.cascade = tmp.path().join("none.xml"));
    assert!(e.contains("none.xml"), "{e}");
    // Nothing half-written: no bundle, no scratch directory.
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
