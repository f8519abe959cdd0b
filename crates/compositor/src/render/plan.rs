//! A Render request checked against its avatar and model: the [`Plan`] its batches are cut
//! from.

use super::{Output, RenderOptions, SentBackgrounds};
use crate::avatar::Avatar;
use crate::error::{invalid, Error};
use crate::idle_frames::IdleBudget;
use crate::inference::ModelInfo;
use crate::raw_frame::Rect;
use bytes::Bytes;
use framecast_proto::compositor::v1::{ImageFormat, RenderRequest, Tensor};
use framecast_proto::echo;
use framecast_proto::tensor::{self, DataType};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A validated request: everything needed to build its batches.
pub(super) struct Plan {
    pub(super) request_id: String,
    pub(super) avatar: Arc<Avatar>,
    pub(super) model: Arc<ModelInfo>,
    pub(super) start: u64,
    pub(super) count: usize,
    pub(super) output: Output,
    pub(super) idle_timeout: Duration,
    /// Conditioning payloads in model input order, each `count` frames long.
    pub(super) conditioning: Vec<(Arc<str>, DataType, Vec<i64>, Bytes)>,
    pub(super) arrived: Instant,
    /// The client's deadline for the stream (`grpc-timeout`), if it set one.
    pub(super) deadline: Option<Instant>,
    /// Whether the request's last frame is marked `last_in_request`.
    pub(super) closes: bool,
    /// Idle frames: the background as it is, no inference.
    pub(super) idle: bool,
    pub(super) idle_budget: Arc<IdleBudget>,
    /// With `RenderRequest.backgrounds_once`: the background JPEGs the stream has sent.
    pub(super) sent: Option<Arc<SentBackgrounds>>,
}

impl Plan {
    pub(super) fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// DEADLINE_EXCEEDED for frames `lo..hi` if the client's deadline has passed.
    pub(super) fn check_deadline(&self, lo: usize, hi: usize) -> Result<(), Error> {
        if !self.past_deadline() {
            return Ok(());
        }
        Err(Error::DeadlineExceeded(format!(
            "request '{}': the stream's deadline passed before frames {}..{} were rendered",
            self.request_id,
            self.start + lo as u64,
            self.start + hi as u64
        )))
    }
}

/// Checks a request against its avatar and model. `sent` is its stream's record of the
/// background JPEGs sent, which the plan takes where the request asks for each once.
pub(super) fn validate(
    req: RenderRequest,
    avatar: Arc<Avatar>,
    model: Arc<ModelInfo>,
    opts: &RenderOptions,
    arrived: Instant,
    deadline: Option<Instant>,
    sent: &Arc<SentBackgrounds>,
) -> Result<Plan, Error> {
    if req.frame_count == 0 || req.frame_count > opts.max_frames_per_request {
        return Err(invalid(format!(
            "frame_count {} is out of range 1..={}",
            req.frame_count, opts.max_frames_per_request
        )));
    }
    if req
        .start_frame
        .checked_add(req.frame_count as u64)
        .is_none()
    {
        return Err(invalid("start_frame + frame_count overflows u64"));
    }
    if req.jpeg_quality > 100 {
        return Err(invalid(format!(
            "jpeg_quality {} is out of range 0..=100 (0: the avatar's default)",
            req.jpeg_quality
        )));
    }
    let format_of = |field: &str, v: i32| match ImageFormat::try_from(v) {
        Ok(ImageFormat::Unspecified) => Ok(None),
        Ok(ImageFormat::Jpeg) => Ok(Some(false)),
        Ok(ImageFormat::I420) => Ok(Some(true)),
        Err(_) => Err(invalid(format!(
            "{field} {v} is not an ImageFormat (IMAGE_FORMAT_JPEG = 1, IMAGE_FORMAT_I420 = 2)"
        ))),
    };
    let frames_i420 = format_of("frame_format", req.frame_format)?.unwrap_or(false);
    let idle_i420 = format_of("idle_frame_format", req.idle_frame_format)?.unwrap_or(frames_i420);
    if (frames_i420 || idle_i420) && req.jpeg_quality != 0 {
        return Err(invalid(format!(
            "jpeg_quality {} is set for IMAGE_FORMAT_I420 frames, which are not JPEG: leave it 0",
            req.jpeg_quality
        )));
    }
    let i420 = if req.idle { idle_i420 } else { frames_i420 };
    let frame_region = match &req.frame_region {
        None => None,
        Some(_) if !frames_i420 => {
            return Err(invalid(
                "frame_region: only with frame_format IMAGE_FORMAT_I420 (a JPEG frame is spliced whole)",
            ))
        }
        Some(r) => {
            let rect = Rect::from(*r);
            let m = &avatar.manifest;
            rect.check_within(m.width, m.height)
                .map_err(|e| invalid(format!("frame_region: {e}")))?;
            Some(rect)
        }
    };
    if model.crop_size != avatar.manifest.crop_size {
        return Err(Error::Mismatch(format!(
            "avatar '{}' has crop_size {} but model '{}' takes {}",
            avatar.manifest.id, avatar.manifest.crop_size, model.name, model.crop_size
        )));
    }
    let count = req.frame_count as usize;
    if req.idle && !req.conditioning.is_empty() {
        return Err(invalid(
            "conditioning: must be empty when idle is set (idle frames run no model)",
        ));
    }
    for (i, t) in req.conditioning.iter().enumerate() {
        if req.conditioning[..i].iter().any(|u| u.name == t.name) {
            return Err(invalid(format!(
                "conditioning[{i}]: '{}' is given twice",
                echo(&t.name)
            )));
        }
        if !model.conditioning.iter().any(|m| m.name == t.name) {
            return Err(invalid(format!(
                "conditioning: '{}' is not an input of model '{}' (expects {})",
                echo(&t.name),
                model.name,
                model
                    .conditioning
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let mut conditioning = Vec::with_capacity(model.conditioning.len());
    let needed = if req.idle {
        &[][..]
    } else {
        &model.conditioning[..]
    };
    for m in needed {
        let mut shape = m.shape.clone();
        shape[0] = count as i64;
        let Some(t) = req.conditioning.iter().find(|t| t.name == m.name) else {
            return Err(invalid(format!(
                "conditioning: '{}' {} {:?} is missing",
                m.name, m.datatype, shape
            )));
        };
        let Tensor {
            name,
            datatype,
            shape: got,
            data,
        } = t.clone();
        let dt = DataType::parse(&datatype).map_err(|e| {
            invalid(format!(
                "conditioning '{name}': datatype: {}",
                echo(&e.to_string())
            ))
        })?;
        if dt.as_str() != m.datatype {
            return Err(invalid(format!(
                "conditioning '{name}': datatype is {dt}; model '{}' expects {}",
                model.name, m.datatype
            )));
        }
        if got != shape {
            return Err(invalid(format!(
                "conditioning '{name}': shape {} should be {shape:?} (frame_count first)",
                echo(&format!("{got:?}"))
            )));
        }
        tensor::check_byte_len(dt, &shape, data.len())
            .map_err(|e| invalid(format!("conditioning '{name}': {e}")))?;
        conditioning.push((Arc::from(name.as_str()), dt, shape, data));
    }
    let output = if i420 {
        match frame_region {
            Some(rect) if !req.idle => Output::I420Region(rect),
            _ => Output::I420,
        }
    } else {
        Output::Jpeg {
            quality: match req.jpeg_quality {
                0 => avatar.manifest.jpeg_quality,
                q => q as u8,
            },
            subsampling: opts.subsampling,
        }
    };
    Ok(Plan {
        request_id: req.request_id,
        avatar,
        model,
        start: req.start_frame,
        count,
        output,
        idle_timeout: opts.idle_timeout,
        conditioning,
        arrived,
        deadline,
        closes: true,
        idle: req.idle,
        idle_budget: opts.idle_budget.clone(),
        sent: req.backgrounds_once.then(|| sent.clone()),
    })
}
