//! `framecast-bench demo`: renders the demo avatar driven by a generated audio envelope and
//! writes what a person can watch: the frames, an MJPEG AVI, and a contact sheet.

use crate::avi;
use crate::client;
use crate::stats::Summary;
use anyhow::{bail, Context, Result};
use framecast_proto::compositor::v1::{RenderRequest, Tensor};
use framecast_proto::tensor::{self, DataType};
use std::path::PathBuf;
use std::time::Instant;
use tokio_stream::StreamExt;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Compositor URL.
    #[arg(long, default_value = "http://127.0.0.1:8011")]
    pub compositor: String,
    #[command(flatten)]
    pub access: client::Access,
    #[arg(long, default_value = "demo")]
    pub avatar: String,
    /// Seconds of video to render.
    #[arg(long, default_value_t = 8.0)]
    pub seconds: f64,
    /// Frames per second of the avatar.
    #[arg(long, default_value_t = 25.0)]
    pub fps: f64,
    /// Frames per render request (a front end asks in chunks).
    #[arg(long, default_value_t = 25)]
    pub chunk: u32,
    /// Output directory: frames/, demo.avi, contact-sheet.png.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
}

/// Audio energy in [0, 1] at time `t`: syllables at ~4 Hz inside phrases with pauses.
pub fn envelope(t: f64) -> f32 {
    let syllable = (2.0 * std::f64::consts::PI * 3.7 * t)
        .sin()
        .max(0.0)
        .powf(0.6);
    let phrase = (2.0 * std::f64::consts::PI * 0.23 * t).sin() * 0.5 + 0.5;
    let pause = if (t % 4.0) > 3.3 { 0.0 } else { 1.0 };
    (syllable * (0.35 + 0.65 * phrase) * pause) as f32
}

/// Per-frame `audio` features [n, 32, 16, 16] whose mean magnitude follows the envelope.
pub fn audio_features(start: u64, n: u32, fps: f64) -> Tensor {
    let per = 32 * 16 * 16;
    let mut v = Vec::with_capacity(n as usize * per);
    for f in 0..n as u64 {
        let e = envelope((start + f) as f64 / fps);
        for k in 0..per {
            let sign = if (k * 7919 + f as usize).is_multiple_of(3) {
                -1.0
            } else {
                1.0
            };
            v.push(sign * e * (0.8 + 0.4 * ((k * 31) % 17) as f32 / 17.0));
        }
    }
    Tensor {
        name: "audio".to_string(),
        datatype: DataType::F32.as_str().to_string(),
        shape: vec![n as i64, 32, 16, 16],
        data: tensor::encode(&v),
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let total = (args.seconds * args.fps).round() as u32;
    if total == 0 || args.chunk == 0 {
        bail!("--seconds and --chunk must give at least one frame");
    }
    let frames_dir = args.out.join("frames");
    std::fs::create_dir_all(&frames_dir)
        .with_context(|| format!("creating {}", frames_dir.display()))?;
    let mut client = client::compositor(&args.compositor, &args.access)?;
    let mut requests = Vec::new();
    let mut start = 0u32;
    while start < total {
        let n = args.chunk.min(total - start);
        requests.push(RenderRequest {
            request_id: format!("demo-{start}"),
            avatar_id: args.avatar.clone(),
            start_frame: start as u64,
            frame_count: n,
            conditioning: vec![audio_features(start as u64, n, args.fps)],
            jpeg_quality: 0,
            audio: None,
        });
        start += n;
    }
    eprintln!(
        "rendering {total} frames of '{}' ({:.1} s at {} fps)",
        args.avatar, args.seconds, args.fps
    );
    let began = Instant::now();
    let mut stream = client
        .render(tokio_stream::iter(requests))
        .await
        .context("Render call failed")?
        .into_inner();
    let mut jpegs = Vec::with_capacity(total as usize);
    let mut summary = Summary::default();
    let mut first = None;
    let (mut width, mut height) = (0, 0);
    while let Some(frame) = stream.next().await {
        let frame = frame.context("Render stream failed")?;
        first.get_or_insert_with(|| began.elapsed());
        if frame.frame_index != jpegs.len() as u64 {
            bail!(
                "frame {} arrived where {} was expected",
                frame.frame_index,
                jpegs.len()
            );
        }
        (width, height) = (frame.width, frame.height);
        if let Some(t) = frame.timings {
            summary.add(&t);
        }
        std::fs::write(
            frames_dir.join(format!("{:06}.jpg", frame.frame_index)),
            &frame.image,
        )?;
        jpegs.push(frame.image.to_vec());
        if jpegs.len().is_multiple_of(50) {
            eprintln!("  {} / {total} frames", jpegs.len());
        }
    }
    let wall = began.elapsed();
    if jpegs.len() != total as usize {
        bail!("stream ended after {} of {total} frames", jpegs.len());
    }
    let avi_path = args.out.join("demo.avi");
    std::fs::write(&avi_path, avi::mjpeg_avi(&jpegs, width, height, args.fps))?;
    let sheet_path = args.out.join("contact-sheet.png");
    contact_sheet(&jpegs, 4, 3)?.save(&sheet_path)?;
    println!(
        "frames        {} ({}x{}) in {}",
        jpegs.len(),
        width,
        height,
        frames_dir.display()
    );
    println!("video         {}", avi_path.display());
    println!("contact sheet {}", sheet_path.display());
    println!(
        "throughput    {:.1} frames/s ({:.2} s wall); first frame after {:.0} ms",
        jpegs.len() as f64 / wall.as_secs_f64(),
        wall.as_secs_f64(),
        first.unwrap_or_default().as_secs_f64() * 1e3
    );
    summary.print();
    Ok(())
}

/// A grid of `cols` x `rows` thumbnails spread evenly over the frames.
fn contact_sheet(jpegs: &[Vec<u8>], cols: u32, rows: u32) -> Result<image::RgbImage> {
    let (tw, th) = (320u32, 180u32);
    let mut sheet = image::RgbImage::from_pixel(cols * tw, rows * th, image::Rgb([16, 16, 16]));
    let cells = (cols * rows) as usize;
    for k in 0..cells.min(jpegs.len()) {
        let i = k * jpegs.len() / cells;
        let img = image::load_from_memory(&jpegs[i])?
            .thumbnail(tw, th)
            .into_rgb8();
        let (x, y) = ((k as u32 % cols) * tw, (k as u32 / cols) * th);
        image::imageops::overlay(&mut sheet, &img, x as i64, y as i64);
    }
    Ok(sheet)
}
