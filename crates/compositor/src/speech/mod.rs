//! Audio sessions on `Render`: speech in, frames out as the audio arrives.
//!
//! A session decodes each PCM packet ([`framecast_audio::pcm`]), resamples it to 16 kHz and
//! extends the mel spectrogram incrementally. Video frame `k` (its index `start_frame + k`)
//! is driven by the 16 mel frames from `floor(80 k / fps)` on; as soon as they exist the
//! frame's audio feature is built, as the avatar's `[audio]` table says (the mel window
//! itself, its loudness, or `stack` encoder embeddings centred on the frame, each window
//! embedded once, in batches shared with the other sessions: [`Encoders`]), and the frames
//! ready are rendered as one request through [`render`].
//! After `end_of_speech` the frames covering the rest of the audio follow, the last marked
//! `last_in_request`. Mel frames and embeddings no later frame needs are dropped, so a long
//! session holds a bounded amount of memory.

mod encoder;

pub use encoder::Encoders;

use crate::avatar::Avatar;
use crate::avatar_store::AvatarLease;
use crate::error::{invalid, Error};
use crate::inference::{EncoderInfo, InferenceClient, ModelInfo};
use crate::manifest::AudioFeatures;
use crate::render::{self, RenderOptions, Target};
use framecast_audio::mel::{MelFrame, MelStream, FLOOR};
use framecast_audio::window::{self, WINDOW};
use framecast_audio::{pcm, Resampler, SampleFormat, N_MELS, SAMPLE_RATE};
use framecast_proto::compositor::v1::{self as v1, AudioChunk, FaceRegion, RenderRequest, Tensor};
use framecast_proto::echo;
use framecast_proto::tensor::{self, DataType};
use framecast_telemetry::prometheus::IntGauge;
use std::collections::VecDeque;
use std::sync::Arc;

/// What the model's audio input gets per frame.
enum Features {
    Mel,
    Energy,
    Encoder {
        info: Arc<EncoderInfo>,
        stack: usize,
    },
}

/// One open audio session of a Render stream.
pub struct Session {
    request_id: String,
    avatar_id: String,
    avatar: Arc<Avatar>,
    /// Held for the session: the avatar is not evicted under it.
    _lease: AvatarLease,
    model: Arc<ModelInfo>,
    start_frame: u64,
    jpeg_quality: u32,
    frame_format: i32,
    idle_frame_format: i32,
    frame_region: Option<FaceRegion>,
    backgrounds_once: bool,
    format: (SampleFormat, u32),
    input: String,
    /// The audio input's shape per frame (without the batch dimension).
    dims: Vec<i64>,
    features: Features,
    fps: f64,
    resampler: Resampler,
    mel: MelStream,
    /// Mel frames `mel_base..` of the session.
    mels: Vec<MelFrame>,
    mel_base: usize,
    /// Frames in the session, known once the speech has ended.
    total: Option<u64>,
    /// The next frame to render.
    next: u64,
    /// Embeddings of frames `emb_base..`.
    embeddings: VecDeque<Vec<f32>>,
    emb_base: u64,
    decoded: Vec<f32>,
    resampled: Vec<f32>,
    /// Counts the mel frames this session holds, with every other session's.
    held: IntGauge,
    /// When the session opened: frame `k` is due `k` periods after (its place on the media
    /// clock, by which the frame clock orders sessions' frames).
    opened: std::time::Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.held.sub(self.mels.len() as i64);
    }
}

fn format_of(f: &v1::AudioFormat) -> Result<(SampleFormat, u32), Error> {
    let sample = match v1::SampleFormat::try_from(f.sample_format) {
        Ok(v1::SampleFormat::S16le) => SampleFormat::S16le,
        Ok(v1::SampleFormat::F32le) => SampleFormat::F32le,
        _ => {
            return Err(invalid(format!(
                "audio.format.sample_format: {} is not SAMPLE_FORMAT_S16LE or SAMPLE_FORMAT_F32LE",
                f.sample_format
            )))
        }
    };
    pcm::check_rate(f.sample_rate)
        .map_err(|e| invalid(format!("audio.format.sample_rate: {e}")))?;
    Ok((sample, f.sample_rate))
}

impl Session {
    /// Opens the session `req` (its first message) asks for, on `avatar` held by `lease`.
    pub async fn open(
        req: &RenderRequest,
        chunk: &AudioChunk,
        lease: AvatarLease,
        model: Arc<ModelInfo>,
        client: &InferenceClient,
        held: IntGauge,
    ) -> Result<Session, Error> {
        if req.frame_count != 0 || !req.conditioning.is_empty() {
            return Err(invalid(
                "frame_count, conditioning: must be unset with audio (the audio decides the frames)",
            ));
        }
        let format = format_of(chunk.format.as_ref().ok_or_else(|| {
            invalid("audio.format: required on the first message of an audio session")
        })?)?;
        let avatar = lease.value().clone();
        let m = &avatar.manifest;
        let Some(settings) = &m.audio else {
            return Err(Error::Mismatch(format!(
                "avatar '{}' has no [audio] table: its model '{}' is not declared to take speech; send conditioning instead",
                m.id, m.model
            )));
        };
        let Some(spec) = model.conditioning.iter().find(|t| t.name == settings.input) else {
            return Err(Error::Mismatch(format!(
                "avatar '{}': [audio] input '{}' is not an input of model '{}'",
                m.id, settings.input, model.name
            )));
        };
        if let Some(other) = model.conditioning.iter().find(|t| t.name != settings.input) {
            return Err(Error::Mismatch(format!(
                "model '{}' also takes '{}', which speech cannot supply; send conditioning instead",
                model.name, other.name
            )));
        }
        if spec.datatype != DataType::F32.as_str() || spec.shape.iter().skip(1).any(|&d| d < 1) {
            return Err(Error::Mismatch(format!(
                "model '{}': audio input '{}' is {} {:?}; speech features are FP32 of a fixed shape",
                model.name, spec.name, spec.datatype, spec.shape
            )));
        }
        let dims = spec.shape[1..].to_vec();
        let per_frame = dims.iter().product::<i64>() as usize;
        let features = match settings.features {
            AudioFeatures::Mel => Features::Mel,
            AudioFeatures::Energy => Features::Energy,
            AudioFeatures::Encoder => {
                let name = settings.encoder.as_deref().unwrap_or_default();
                let info = client
                    .encoder_info(name)
                    .await
                    .map_err(|s| Error::inference(format!("audio encoder '{name}'"), s))?;
                Features::Encoder {
                    info,
                    stack: settings.stack,
                }
            }
        };
        let want = match &features {
            Features::Mel => Some(N_MELS * WINDOW),
            Features::Encoder { info, stack } => Some(stack * info.width),
            Features::Energy => None,
        };
        if let Some(want) = want.filter(|&w| w != per_frame) {
            return Err(Error::Mismatch(format!(
                "model '{}': audio input '{}' {:?} holds {per_frame} values per frame; the avatar's [audio] features give {want}",
                model.name, spec.name, spec.shape
            )));
        }
        Ok(Session {
            request_id: req.request_id.clone(),
            avatar_id: req.avatar_id.clone(),
            fps: m.fps,
            avatar: avatar.clone(),
            _lease: lease,
            model,
            start_frame: req.start_frame,
            jpeg_quality: req.jpeg_quality,
            frame_format: req.frame_format,
            idle_frame_format: req.idle_frame_format,
            frame_region: req.frame_region,
            backgrounds_once: req.backgrounds_once,
            format,
            input: settings.input.clone(),
            dims,
            features,
            resampler: Resampler::new(format.1)
                .map_err(|e| invalid(format!("audio.format.sample_rate: {e}")))?,
            mel: MelStream::new(),
            mels: Vec::new(),
            mel_base: 0,
            total: None,
            next: 0,
            embeddings: VecDeque::new(),
            emb_base: 0,
            decoded: Vec::new(),
            resampled: Vec::new(),
            held,
            opened: std::time::Instant::now(),
        })
    }

    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// Drops the speech received and not yet rendered (`AudioChunk.cancel`): every mel frame
    /// a frame from the next one on reads becomes silence (and so does what the mel stream
    /// still holds), and the embeddings of those frames go. Those frames then render idle;
    /// indices and the clock are unchanged.
    pub fn cancel(&mut self) {
        // What the resampler and the mel stream still hold of the speech becomes silence,
        // the same length, so the session's clock does not move.
        self.mel.silence_pending();
        let owed = self.resampler.drop_pending();
        let before = self.mels.len();
        self.mel.push(&vec![0.0; owed], &mut self.mels);
        self.held.add((self.mels.len() - before) as i64);
        let from = window::start(self.next, self.fps);
        for (i, m) in self.mels.iter_mut().enumerate() {
            if self.mel_base + i >= from {
                *m = [FLOOR; N_MELS];
            }
        }
        let keep = self.next.saturating_sub(self.emb_base) as usize;
        self.embeddings.truncate(keep);
    }

    /// Frames of the session rendered so far: what a stream's progress is measured by.
    pub fn frames_rendered(&self) -> u64 {
        self.next
    }

    /// Checks a later message of the session: only audio, the same ids and format.
    pub fn check_continuation(&self, req: &RenderRequest, chunk: &AudioChunk) -> Result<(), Error> {
        if !req.request_id.is_empty() && req.request_id != self.request_id {
            return Err(invalid(format!(
                "request_id: '{}' arrived while audio session '{}' is open; end it with audio.end_of_speech first",
                echo(&req.request_id),
                echo(&self.request_id)
            )));
        }
        if !req.avatar_id.is_empty() && req.avatar_id != self.avatar_id {
            return Err(invalid(format!(
                "avatar_id: '{}' differs from the open audio session's '{}'",
                echo(&req.avatar_id),
                echo(&self.avatar_id)
            )));
        }
        if req.frame_count != 0 || !req.conditioning.is_empty() {
            return Err(invalid(
                "frame_count, conditioning: must be unset with audio (the audio decides the frames)",
            ));
        }
        if req.frame_format != 0 && req.frame_format != self.frame_format {
            return Err(invalid(
                "frame_format: differs from the open audio session's; end the session to change it",
            ));
        }
        if req.idle_frame_format != 0 && req.idle_frame_format != self.idle_frame_format {
            return Err(invalid(
                "idle_frame_format: differs from the open audio session's; end the session to change it",
            ));
        }
        if req.frame_region.is_some() && req.frame_region != self.frame_region {
            return Err(invalid(
                "frame_region: differs from the open audio session's; end the session to change it",
            ));
        }
        if let Some(f) = &chunk.format {
            if format_of(f)? != self.format {
                return Err(invalid(
                    "audio.format: differs from the session's; end the session to change it",
                ));
            }
        }
        Ok(())
    }

    /// Seconds of audio taken and not yet rendered as frames.
    pub fn audio_ahead(&self) -> f64 {
        self.mel.samples() as f64 / SAMPLE_RATE as f64 - self.next as f64 / self.fps
    }

    /// Takes one packet of audio (and the end of speech, when it says so).
    pub fn push(&mut self, chunk: &AudioChunk, opts: &RenderOptions) -> Result<(), Error> {
        let (format, rate) = self.format;
        self.decoded.clear();
        pcm::decode(format, &chunk.pcm, &mut self.decoded)
            .map_err(|e| invalid(format!("audio.pcm: {e}")))?;
        // Audio beyond the buffer is refused before any of it is taken.
        let incoming = self.decoded.len() as f64 / rate as f64;
        let held = self.audio_ahead();
        let limit = opts.max_audio_ahead.as_secs_f64();
        if held + incoming > limit {
            return Err(Error::Exhausted(format!(
                "audio.pcm: {:.2} s of audio would wait for frames; the limit is {limit} s (--max-audio-ahead-s): send audio at most that far ahead of the frames received",
                held + incoming
            )));
        }
        self.resampled.clear();
        self.resampler.push(&self.decoded, &mut self.resampled);
        if chunk.end_of_speech {
            self.resampler.finish(&mut self.resampled);
        }
        let before = self.mels.len();
        self.mel.push(&self.resampled, &mut self.mels);
        if chunk.end_of_speech {
            self.mel.finish(&mut self.mels);
            // The end is always marked on a frame: when every frame of the audio has been
            // sent already (or there was none), one more (silent: the background) carries
            // last_in_request.
            let frames = window::frames_for(self.mel.samples(), self.fps);
            self.total = Some(frames.max(self.next + 1));
        }
        self.held.add((self.mels.len() - before) as i64);
        Ok(())
    }

    /// True once every frame of an ended session has been rendered.
    pub fn done(&self) -> bool {
        self.total.is_some_and(|t| self.next >= t)
    }

    /// Mel frames computed so far.
    fn mel_count(&self) -> usize {
        self.mel_base + self.mels.len()
    }

    /// Whether frame `k`'s window is complete.
    fn window_ready(&self, k: u64) -> bool {
        match self.total {
            Some(t) => k < t,
            None => window::start(k, self.fps) + WINDOW <= self.mel_count(),
        }
    }

    /// Whether frame `k` can be rendered now.
    fn frame_ready(&self, k: u64) -> bool {
        match (&self.features, self.total) {
            (_, Some(t)) => k < t,
            (Features::Encoder { stack, .. }, None) => {
                self.window_ready(k + (*stack as u64).div_ceil(2) - 1)
            }
            _ => self.window_ready(k),
        }
    }

    /// Frame `k`'s mel window, band-major ([1, 80, 16] as the recipe lays it out). Only
    /// ready frames are asked for, so the window is there (or, after the speech, the last).
    fn window(&self, k: u64) -> Vec<f32> {
        let frames =
            window::window(&self.mels, self.mel_base, k, self.fps, true).unwrap_or_default();
        let mut out = vec![FLOOR; N_MELS * WINDOW];
        for (t, frame) in frames.iter().enumerate() {
            for (b, v) in frame.iter().enumerate() {
                out[b * WINDOW + t] = *v;
            }
        }
        out
    }

    /// Whether frame `k` is idle: its window's loudness is under `threshold` (0: never).
    fn idle(&self, k: u64, threshold: f32) -> bool {
        threshold > 0.0 && window::loudness(&self.window(k)) < threshold
    }

    /// Renders every frame whose audio has arrived: runs of speaking and of idle frames (see
    /// [`RenderOptions::idle_loudness`]), one request each (several past
    /// `max_frames_per_request`). Idle frames need no features and no inference.
    pub async fn render_ready(
        &mut self,
        target: &Target<'_>,
        encoders: &Encoders,
    ) -> Result<(), Error> {
        let mut end = self.next;
        while self.frame_ready(end) {
            end += 1;
        }
        let threshold = target.opts.idle_loudness;
        while self.next < end {
            let cap = end.min(self.next + target.opts.max_frames_per_request.max(1) as u64);
            let idle = self.idle(self.next, threshold);
            let mut hi = self.next + 1;
            while hi < cap && self.idle(hi, threshold) == idle {
                hi += 1;
            }
            let n = hi - self.next;
            let conditioning = if idle {
                Vec::new()
            } else {
                let data = self.features(self.next, hi, target, encoders).await?;
                let mut shape = vec![n as i64];
                shape.extend(&self.dims);
                vec![Tensor {
                    name: self.input.clone(),
                    datatype: DataType::F32.as_str().to_string(),
                    shape,
                    data: tensor::encode(&data),
                }]
            };
            if self.start_frame.checked_add(hi).is_none() {
                return Err(invalid(format!(
                    "start_frame: {} plus the session's {hi} frames overflows the frame index (u64): start lower",
                    self.start_frame
                )));
            }
            let req = RenderRequest {
                request_id: self.request_id.clone(),
                avatar_id: self.avatar_id.clone(),
                start_frame: self.start_frame + self.next,
                frame_count: n as u32,
                conditioning,
                jpeg_quality: self.jpeg_quality,
                frame_format: self.frame_format,
                idle_frame_format: self.idle_frame_format,
                frame_region: self.frame_region,
                backgrounds_once: self.backgrounds_once,
                resend_backgrounds: false,
                audio: None,
                idle,
            };
            let closes = self.total == Some(hi);
            let due = self.opened + std::time::Duration::from_secs_f64(self.next as f64 / self.fps);
            let (avatar, model) = (self.avatar.clone(), self.model.clone());
            render::render(req, avatar, model, target, closes, Some(due)).await?;
            self.next = hi;
            self.forget();
        }
        Ok(())
    }

    /// The audio features of frames `lo..hi`, end to end.
    async fn features(
        &mut self,
        lo: u64,
        hi: u64,
        target: &Target<'_>,
        encoders: &Encoders,
    ) -> Result<Vec<f32>, Error> {
        let per: usize = self.dims.iter().product::<i64>() as usize;
        let mut out = Vec::with_capacity((hi - lo) as usize * per);
        match &self.features {
            Features::Mel => (lo..hi).for_each(|k| out.extend(self.window(k))),
            Features::Energy => {
                for k in lo..hi {
                    let e = window::loudness(&self.window(k));
                    out.extend(std::iter::repeat_n(e, per));
                }
            }
            Features::Encoder { info, stack } => {
                let (info, stack) = (info.clone(), *stack as u64);
                let half = stack / 2;
                let last = match self.total {
                    Some(t) => t.saturating_sub(1),
                    None => hi - 1 + stack.div_ceil(2) - 1,
                };
                let through = (hi - 1 + stack.div_ceil(2) - 1).min(last);
                self.embed_through(through, &info, target, encoders).await?;
                for k in lo..hi {
                    for j in 0..stack {
                        let f = (k + j).saturating_sub(half).min(last);
                        out.extend_from_slice(&self.embeddings[(f - self.emb_base) as usize]);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Embeds the windows of frames up to `through` not embedded yet, at most `max_batch`
    /// windows per ask.
    async fn embed_through(
        &mut self,
        through: u64,
        info: &Arc<EncoderInfo>,
        target: &Target<'_>,
        encoders: &Encoders,
    ) -> Result<(), Error> {
        let batch = target.opts.max_batch.max(1) as u64;
        loop {
            let first = self.emb_base + self.embeddings.len() as u64;
            if first > through {
                return Ok(());
            }
            let last = through.min(first + batch - 1);
            let n = (last - first + 1) as usize;
            let mut windows = Vec::with_capacity(n * N_MELS * WINDOW);
            for k in first..=last {
                windows.extend(self.window(k));
            }
            let values = encoders
                .embed(info, windows, n, target.deadline)
                .await
                .map_err(|s| {
                    let context =
                        format!("audio encoder '{}' for frames {first}..={last}", info.name);
                    Error::inference(context, s)
                })?;
            self.embeddings
                .extend(values.chunks_exact(info.width).map(<[f32]>::to_vec));
        }
    }

    /// Drops mel frames and embeddings no frame from `next` on reads.
    fn forget(&mut self) {
        let back = match &self.features {
            Features::Encoder { stack, .. } => *stack as u64 / 2,
            _ => 0,
        };
        let oldest = self.next.saturating_sub(back);
        while self.emb_base < oldest && !self.embeddings.is_empty() {
            self.embeddings.pop_front();
            self.emb_base += 1;
        }
        if self.embeddings.is_empty() {
            // Idle frames were not embedded: the next embedding starts where frames read.
            self.emb_base = self.emb_base.max(oldest);
        }
        // The last window of an ended session reads the last 16 mel frames: keep those too.
        let keep = window::start(oldest, self.fps).min(self.mel_count().saturating_sub(WINDOW));
        if keep > self.mel_base {
            let drop = (keep - self.mel_base).min(self.mels.len());
            self.mels.drain(..drop);
            self.mel_base += drop;
            self.held.sub(drop as i64);
        }
    }
}
