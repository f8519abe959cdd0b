//! The SDP answer as the browser gets it: every track the gateway sends in one media stream.
//!
//! A browser plays the tracks of one stream (the first field of `a=msid`) in sync, lining
//! their RTP clocks up through the sender reports; tracks of different streams play each as
//! soon as it can, and the voice's jitter buffer then holds it behind its frames. The WebRTC
//! library answers the audio m-line with the stream the browser offered and gives the video
//! of a `recvonly` m-line a random one of its own, so the gateway names one stream for both.

/// The stream id the gateway's tracks share (ids are scoped to one peer connection).
pub const STREAM_ID: &str = "framecast";

/// `sdp` with the stream of every `a=msid` (and `a=ssrc:... msid:`) line set to
/// [`STREAM_ID`] and the session's `a=msid-semantic` naming it; every other line as it was.
pub fn one_stream(sdp: &str) -> String {
    let mut out = String::with_capacity(sdp.len() + 32);
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let ending = &line[body.len()..];
        if body.starts_with("a=msid-semantic:") {
            out.push_str("a=msid-semantic: WMS ");
            out.push_str(STREAM_ID);
        } else if let Some(rest) = body.strip_prefix("a=msid:") {
            out.push_str("a=msid:");
            out.push_str(&restream(rest));
        } else if let Some((head, rest)) = body
            .strip_prefix("a=ssrc:")
            .and_then(|_| body.split_once(" msid:"))
        {
            out.push_str(head);
            out.push_str(" msid:");
            out.push_str(&restream(rest));
        } else {
            out.push_str(body);
        }
        out.push_str(ending);
    }
    out
}

/// `<stream> <track>` with the stream replaced; a lone id is the stream.
fn restream(ids: &str) -> String {
    match ids.split_once(' ') {
        Some((_, track)) => format!("{STREAM_ID} {track}"),
        None => STREAM_ID.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_track_joins_one_stream_and_nothing_else_changes() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\na=msid-semantic: WMS abc xyz\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=msid:abc trackA\r\n\
                   a=ssrc:11 cname:x\r\na=ssrc:11 msid:abc trackA\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=msid:xyz trackV\r\n\
                   a=ssrc:22 msid:xyz trackV\r\na=rtpmap:96 H264/90000\r\n";
        let got = one_stream(sdp);
        let want = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\na=msid-semantic: WMS framecast\r\n\
                    m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=msid:framecast trackA\r\n\
                    a=ssrc:11 cname:x\r\na=ssrc:11 msid:framecast trackA\r\n\
                    m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=msid:framecast trackV\r\n\
                    a=ssrc:22 msid:framecast trackV\r\na=rtpmap:96 H264/90000\r\n";
        assert_eq!(got, want);
        // Unix line endings and an SDP without msid pass through as they were.
        let plain = "v=0\nm=video 9 UDP/TLS/RTP/SAVPF 96\na=rtpmap:96 H264/90000\n";
        assert_eq!(one_stream(plain), plain);
    }
}
