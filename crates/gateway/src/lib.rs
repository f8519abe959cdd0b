//! framecast-gateway: the WebRTC front end. A browser posts an SDP offer (WHIP/WHEP style:
//! `POST /sessions?avatar=ID` with `application/sdp`, the answer back, `DELETE` ends it);
//! its microphone (Opus) is decoded and streamed into a compositor `Render` audio session,
//! whose raw I420 frames are encoded to H.264 (or VP8) and sent back with the browser's own
//! voice, delayed so lips and sound meet ([`pacing`]). It also serves the page (`GET /`).
//!
//! Each session runs its WebRTC connection (str0m, sans-IO) on an OS thread with a UDP port of
//! its own ([`session`]); the HTTP side ([`http`]) only creates, lists and ends sessions.

pub mod admission;
pub mod answer;
pub mod api;
pub mod audio_in;
pub mod backgrounds;
pub mod events;
pub mod fuzzing;
pub mod http;
pub mod idle_video;
pub mod media;
pub mod metrics;
pub mod offer;
pub mod pacing;
pub mod session;
pub mod speech;
pub mod splice;
pub mod stap_a;
pub mod tts;
pub mod video_out;
pub mod whip;

pub use http::{serve, Gateway, GatewayOptions};

use framecast_proto::auth::AddToken;
use framecast_proto::compositor::v1::compositor_client::CompositorClient;
use framecast_telemetry::tls::ClientTls;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The compositor as the gateway calls it: with its bearer token, if it needs one.
pub type Compositor = CompositorClient<InterceptedService<Channel, AddToken>>;

/// A [`Compositor`] for `url`, connecting on first use: an `https://` URL needs `tls` (the CA
/// of the compositor's certificate, and the gateway's own identity where the compositor wants
/// mutual TLS). Frames up to 64 MiB (an I420 4K frame is 12 MB).
pub fn connect(
    url: &str,
    tls: Option<&ClientTls>,
    token: Option<&str>,
) -> anyhow::Result<Compositor> {
    let channel = framecast_telemetry::tls::endpoint(url, tls, "compositor-tls")?
        // A 720p raw frame is 1.4 MB: windows of a few frames and 1 MiB DATA frames, not the
        // 64 KiB window and 16 KiB frames of the defaults (a window update every 64 KiB).
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(64 << 20))
        .max_frame_size(1u32 << 20)
        .tcp_nodelay(true)
        .connect_lazy();
    let auth =
        AddToken::new(token).map_err(|e| anyhow::anyhow!("compositor-token: {}", e.message()))?;
    Ok(CompositorClient::with_interceptor(channel, auth)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}
