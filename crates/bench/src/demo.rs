//! `framecast-bench demo`: the demo avatar speaks a sentence (espeak-ng, or a WAV file) over
//! an audio session, and what a person can watch is written: the frames, an MJPEG AVI with
//! the speech as its sound track, and a contact sheet.

use crate::avi;
use crate::client;
use crate::stats::Summary;
use anyhow::{bail, Context, Result};
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_proto::compositor::v1::{
    AudioChunk, AudioFormat, AvatarInfo, LoadAvatarRequest, RenderRequest, SampleFormat,
};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio_stream::StreamExt;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Compositor URL.
    #[arg(long, default_value = "http://127.0.0.1:8011")]
    pub compositor: String,
    #[command(flatten)]
    pub access: client::Access,
    /// Avatar to render; it must declare an `[audio]` table.
    #[arg(long, default_value = "demo")]
    pub avatar: String,
    /// What the avatar says, spoken by espeak-ng.
    #[arg(long, default_value = DEFAULT_TEXT)]
    pub text: String,
    /// A WAV file (mono, 16-bit PCM, 8-48 kHz) to speak instead of --text.
    #[arg(long)]
    pub wav: Option<PathBuf>,
    /// Milliseconds of audio per Render message (a front end streams small packets).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub packet_ms: u32,
    /// Output directory: frames/, demo.avi (with sound), speech.wav, contact-sheet.png.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
}

pub const DEFAULT_TEXT: &str =
    "Hello! I am a framecast avatar. My lips move with the words I say, \
    frame by frame, while the speech is still arriving. Pauses close my mouth.";

/// Speech as mono 16-bit samples at its rate: `wav`, or `text` spoken by espeak-ng (written
/// as `out/speech.wav` either way).
pub fn speech(text: &str, wav: Option<&Path>, out: &Path) -> Result<(u32, Vec<i16>)> {
    let path = out.join("speech.wav");
    match wav {
        Some(w) => {
            std::fs::copy(w, &path).with_context(|| format!("copying {}", w.display()))?;
        }
        None => {
            let status = std::process::Command::new("espeak-ng")
                .arg("-w")
                .arg(&path)
                .arg(text)
                .status()
                .context("running espeak-ng (scripts/setup.sh installs it; or pass --wav)")?;
            if !status.success() {
                bail!("espeak-ng failed ({status})");
            }
        }
    }
    read_wav(&path)
}

/// A mono 16-bit PCM WAV file: its rate and samples.
pub fn read_wav(path: &Path) -> Result<(u32, Vec<i16>)> {
    let mut reader =
        hound::WavReader::open(path).with_context(|| format!("reading {}", path.display()))?;
    let spec = reader.spec();
    if spec.channels != 1
        || spec.bits_per_sample != 16
        || spec.sample_format != hound::SampleFormat::Int
    {
        bail!(
            "{}: {} channel(s), {}-bit {:?}; speech must be mono 16-bit PCM",
            path.display(),
            spec.channels,
            spec.bits_per_sample,
            spec.sample_format
        );
    }
    let samples = reader.samples::<i16>().collect::<Result<Vec<_>, _>>()?;
    Ok((spec.sample_rate, samples))
}

/// The Render messages of one audio session speaking `samples`: `packet` samples each, the
/// first opening the session, the last ending the speech.
pub fn session(
    request_id: &str,
    avatar: &str,
    rate: u32,
    samples: &[i16],
    packet: usize,
) -> Vec<RenderRequest> {
    let chunks: Vec<&[i16]> = samples.chunks(packet.max(1)).collect();
    let n = chunks.len().max(1);
    (0..n)
        .map(|i| {
            let pcm: Vec<u8> = chunks
                .get(i)
                .map(|c| c.iter().flat_map(|s| s.to_le_bytes()).collect())
                .unwrap_or_default();
            let first = i == 0;
            RenderRequest {
                request_id: if first {
                    request_id.to_string()
                } else {
                    String::new()
                },
                avatar_id: if first {
                    avatar.to_string()
                } else {
                    String::new()
                },
                audio: Some(AudioChunk {
                    format: first.then_some(AudioFormat {
                        sample_format: SampleFormat::S16le as i32,
                        sample_rate: rate,
                    }),
                    pcm: pcm.into(),
                    end_of_speech: i + 1 == n,
                    cancel: false,
                }),
                ..Default::default()
            }
        })
        .collect()
}

/// The avatar `id` as the compositor describes it, loading it if needed.
pub async fn avatar_info(
    client: &mut CompositorClient<client::Authed>,
    id: &str,
) -> Result<AvatarInfo> {
    client
        .load_avatar(LoadAvatarRequest {
            avatar_id: id.to_string(),
        })
        .await
        .context("LoadAvatar failed")?
        .into_inner()
        .avatar
        .context("LoadAvatar answered without the avatar")
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let frames_dir = args.out.join("frames");
    std::fs::create_dir_all(&frames_dir)
        .with_context(|| format!("creating {}", frames_dir.display()))?;
    let (rate, samples) = speech(&args.text, args.wav.as_deref(), &args.out)?;
    let seconds = samples.len() as f64 / rate as f64;
    let mut client = client::compositor(&args.compositor, &args.access)?;
    let info = avatar_info(&mut client, &args.avatar).await?;
    let fps = info.fps;
    let total = (seconds * fps - 1e-9).ceil() as usize;
    let packet = (rate as usize * args.packet_ms as usize / 1000).max(1);
    let messages = session("demo", &args.avatar, rate, &samples, packet);
    eprintln!(
        "speaking {seconds:.1} s of audio ({rate} Hz) to '{}' in {} messages: {total} frames at {fps} fps",
        args.avatar,
        messages.len()
    );
    let began = Instant::now();
    let mut stream = client
        .render(tokio_stream::iter(messages))
        .await
        .context("Render call failed")?
        .into_inner();
    let mut jpegs = Vec::with_capacity(total);
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
    if jpegs.len() != total {
        bail!("stream ended after {} of {total} frames", jpegs.len());
    }
    let avi_path = args.out.join("demo.avi");
    let audio = avi::Audio {
        rate,
        samples: &samples,
    };
    std::fs::write(
        &avi_path,
        avi::mjpeg_avi(&jpegs, width, height, fps, Some(audio)),
    )?;
    let sheet_path = args.out.join("contact-sheet.png");
    contact_sheet(&jpegs, 4, 3)?.save(&sheet_path)?;
    println!(
        "frames        {} ({}x{}) in {}",
        jpegs.len(),
        width,
        height,
        frames_dir.display()
    );
    println!("video         {} (MJPEG, PCM sound)", avi_path.display());
    println!("speech        {}", args.out.join("speech.wav").display());
    println!("contact sheet {}", sheet_path.display());
    println!(
        "throughput    {:.1} frames/s ({:.2} s wall for {seconds:.1} s of speech); first frame after {:.0} ms",
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
