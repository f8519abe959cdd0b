//! What the gateway needs from a browser's SDP offer, checked before any WebRTC state is made:
//! a microphone it may receive (an audio m-line the browser sends on) and a video m-line it
//! may send H.264 or VP8 on, and payload types that mean one codec of the m-line's own kind
//! (an offer mapping an audio payload type to a video codec once made the WebRTC library
//! panic). Each refusal says which, so a front-end developer can fix the page.

use crate::media::VideoCodec;

/// What a valid offer allows.
#[derive(Debug, PartialEq, Eq)]
pub struct Offered {
    /// The video codecs the gateway encodes that the browser can receive, in the offer's
    /// order (the browser's preference).
    pub video: Vec<VideoCodec>,
}

impl Offered {
    /// The first of `preference` (the gateway's order) the browser offered.
    pub fn choose(&self, preference: &[VideoCodec]) -> Option<VideoCodec> {
        preference.iter().copied().find(|c| self.video.contains(c))
    }
}

/// Checks `sdp`; the error is the reason, for a 400 answer.
pub fn check(sdp: &str) -> Result<Offered, String> {
    if !sdp.trim_start().starts_with("v=0") {
        return Err("the body is not an SDP offer (it must start with \"v=0\")".into());
    }
    let mut sections: Vec<Section> = Vec::new();
    let mut codecs: std::collections::HashMap<String, String> = Default::default();
    for line in sdp.lines().map(str::trim_end) {
        if let Some(m) = line.strip_prefix("m=") {
            let mut fields = m.split(' ');
            let mut s = Section::fresh(fields.next().unwrap_or(""));
            // m=<media> <port> <proto> <fmt> ...: the payload types it carries.
            s.formats = fields.skip(2).map(str::to_string).collect();
            sections.push(s);
        } else if let Some(s) = sections.last_mut() {
            match line {
                "a=recvonly" | "a=inactive" => s.browser_sends = false,
                "a=sendonly" => s.browser_receives = false,
                _ => {}
            }
            if let Some(map) = line.strip_prefix("a=rtpmap:") {
                let (pt, codec) = map.split_once(' ').unwrap_or((map, ""));
                let name = codec.split('/').next().unwrap_or("").to_ascii_uppercase();
                let upper = codec.to_ascii_uppercase();
                for (known, rtpmap) in [
                    (VideoCodec::H264, "H264/90000"),
                    (VideoCodec::Vp8, "VP8/90000"),
                ] {
                    if s.kind == "video" && upper.starts_with(rtpmap) && !s.video.contains(&known) {
                        s.video.push(known);
                    }
                }
                let other = match s.kind.as_str() {
                    "audio" => VIDEO_CODECS.contains(&name.as_str()).then_some("video"),
                    "video" => AUDIO_CODECS.contains(&name.as_str()).then_some("audio"),
                    _ => None,
                };
                if let Some(other) = other {
                    return Err(format!(
                        "the offer's {} m-line maps payload type {} to {}, a {other} codec: each m-line's payload types must be codecs of its own kind",
                        s.kind,
                        pt.trim(),
                        short(codec)
                    ));
                }
                let pt = pt.trim().to_string();
                match codecs.get(&pt) {
                    Some(seen) if !seen.eq_ignore_ascii_case(codec) => {
                        return Err(format!(
                            "the offer maps payload type {pt} to both {} and {}: a payload type means one codec",
                            short(seen),
                            short(codec)
                        ))
                    }
                    _ => {
                        codecs.insert(pt, codec.to_string());
                    }
                }
            }
        }
    }
    // A payload type an m-line carries that another m-line maps to a codec of the other
    // kind (the rtpmap lines above checked each m-line's own).
    for s in &sections {
        for pt in &s.formats {
            let Some(codec) = codecs.get(pt) else {
                continue;
            };
            let name = codec.split('/').next().unwrap_or("").to_ascii_uppercase();
            let other = match s.kind.as_str() {
                "audio" => VIDEO_CODECS.contains(&name.as_str()),
                "video" => AUDIO_CODECS.contains(&name.as_str()),
                _ => false,
            };
            if other {
                return Err(format!(
                    "the offer's {} m-line carries payload type {}, which the offer maps to {}: each m-line's payload types must be codecs of its own kind",
                    s.kind,
                    short(pt),
                    short(codec)
                ));
            }
        }
    }
    let audio: Vec<&Section> = sections.iter().filter(|s| s.kind == "audio").collect();
    let video: Vec<&Section> = sections.iter().filter(|s| s.kind == "video").collect();
    if audio.is_empty() {
        return Err(
            "the offer has no audio m-line: add the microphone track (getUserMedia({audio: true})) before createOffer".into(),
        );
    }
    if !audio.iter().any(|s| s.browser_sends) {
        return Err("the offer's audio is recvonly or inactive: the gateway needs the microphone (sendrecv or sendonly)".into());
    }
    if video.is_empty() {
        return Err(
            "the offer has no video m-line: add a transceiver (addTransceiver('video', {direction: 'recvonly'}))".into(),
        );
    }
    if !video.iter().any(|s| s.browser_receives) {
        return Err("the offer's video is sendonly: the gateway sends the avatar's video (recvonly or sendrecv)".into());
    }
    let mut offered = Vec::new();
    for c in video
        .iter()
        .filter(|s| s.browser_receives)
        .flat_map(|s| &s.video)
    {
        if !offered.contains(c) {
            offered.push(*c);
        }
    }
    if offered.is_empty() {
        return Err(
            "the offer's video has neither H.264 nor VP8: the gateway encodes those two".into(),
        );
    }
    Ok(Offered { video: offered })
}

/// Codec names (as rtpmap writes them) that only video m-lines carry.
const VIDEO_CODECS: &[&str] = &[
    "H264",
    "H265",
    "VP8",
    "VP9",
    "AV1",
    "AV1X",
    "RTX",
    "ULPFEC",
    "FLEXFEC-03",
];
/// Codec names that only audio m-lines carry.
const AUDIO_CODECS: &[&str] = &[
    "OPUS",
    "G722",
    "PCMU",
    "PCMA",
    "ISAC",
    "ILBC",
    "CN",
    "TELEPHONE-EVENT",
    "L16",
    "G729",
];

/// At most 64 characters of a client's string, for a refusal.
fn short(s: &str) -> String {
    let end = s.char_indices().nth(64).map_or(s.len(), |(i, _)| i);
    framecast_proto::echo(&s[..end]).to_string()
}

struct Section {
    kind: String,
    /// The payload types its m= line lists.
    formats: Vec<String>,
    browser_sends: bool,
    browser_receives: bool,
    /// The codecs the gateway encodes among its rtpmap lines, in their order.
    video: Vec<VideoCodec>,
}

impl Section {
    fn fresh(kind: &str) -> Section {
        Section {
            kind: kind.into(),
            formats: Vec::new(),
            browser_sends: true,
            browser_receives: true,
            video: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(audio_dir: &str, video: &str) -> String {
        format!(
            "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
             m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=rtpmap:111 opus/48000/2\r\n{audio_dir}\
             {video}"
        )
    }

    const VIDEO: &str = "m=video 9 UDP/TLS/RTP/SAVPF 96 102\r\na=rtpmap:96 VP8/90000\r\na=rtpmap:102 H264/90000\r\na=recvonly\r\n";

    /// The video codecs come in the offer's order; the gateway's preference chooses.
    #[test]
    fn a_browser_offer_with_microphone_and_a_known_codec_passes() {
        let both = check(&offer("a=sendrecv\r\n", VIDEO)).unwrap();
        assert_eq!(both.video, [VideoCodec::Vp8, VideoCodec::H264]);
        assert_eq!(
            both.choose(&[VideoCodec::H264, VideoCodec::Vp8]),
            Some(VideoCodec::H264)
        );
        assert_eq!(both.choose(&[VideoCodec::Vp8]), Some(VideoCodec::Vp8));
        let vp8_only = VIDEO.replace("a=rtpmap:102 H264/90000\r\n", "");
        let vp8 = check(&offer("a=sendrecv\r\n", &vp8_only)).unwrap();
        assert_eq!(vp8.video, [VideoCodec::Vp8]);
        assert_eq!(vp8.choose(&[VideoCodec::H264]), None);
    }

    #[test]
    fn each_missing_part_is_named() {
        let e = |sdp: &str| check(sdp).unwrap_err();
        assert!(e("hello").contains("not an SDP offer"));
        assert!(e(&offer("a=recvonly\r\n", VIDEO)).contains("recvonly"));
        assert!(e(&offer("a=sendrecv\r\n", "")).contains("no video m-line"));
        let vp9_only = VIDEO
            .replace("a=rtpmap:102 H264/90000\r\n", "")
            .replace("VP8", "VP9");
        assert!(e(&offer("a=sendrecv\r\n", &vp9_only)).contains("neither H.264 nor VP8"));
        let sendonly = VIDEO.replace("a=recvonly", "a=sendonly");
        assert!(e(&offer("a=sendrecv\r\n", &sendonly)).contains("sendonly"));
        let no_audio = "v=0\r\ns=-\r\n".to_string() + VIDEO;
        assert!(e(&no_audio).contains("no audio m-line"));
    }

    /// An audio m-line listing a video codec (str0m panicked on it), or one payload type
    /// mapped to two codecs, is refused naming the payload type.
    #[test]
    fn payload_types_of_the_wrong_kind_are_refused() {
        let e = |sdp: &str| check(sdp).unwrap_err();
        let audio_h264 = offer("a=sendrecv\r\n", VIDEO).replace(
            "a=rtpmap:111 opus/48000/2\r\n",
            "a=rtpmap:111 opus/48000/2\r\na=rtpmap:102 H264/90000\r\n",
        );
        let why = e(&audio_h264);
        assert!(
            why.contains("payload type 102") && why.contains("video codec"),
            "{why}"
        );
        let twice = offer("a=sendrecv\r\n", &VIDEO.replace("96 VP8", "111 VP8"));
        assert!(e(&twice).contains("payload type 111"), "{}", e(&twice));
        // Listed on the audio m-line, mapped to H.264 only on the video one.
        let listed = offer("a=sendrecv\r\n", VIDEO).replace("SAVPF 111", "SAVPF 111 102");
        let why = e(&listed);
        assert!(why.contains("carries payload type 102"), "{why}");
    }
}
