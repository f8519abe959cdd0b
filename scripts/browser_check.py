"""Drives headless Chromium against a running framecast-gateway and reports what the page saw.

The page is opened with autostart (the fake microphone plays --wav, looped by Chromium) and a
probe rectangle; after --seconds of video the script reads window.framecast and the video's
getStats(), saves a screenshot, hangs up, and prints one JSON object on stdout. It asserts
nothing itself: the caller (crates/e2e/tests/browser.rs, or a person) judges the figures.

  python browser_check.py --url http://127.0.0.1:8021 --avatar browser \
      --sentence "Hello there." --probe 200,180,60,30 --seconds 22 \
      --screenshot out/browser/page.png [--runs N]

The fake microphone plays --wav, or (--sentence) the sentence spoken by espeak-ng followed by
three seconds of silence; speech_s in the JSON is the spoken part's length.

With --runs N the page is loaded N times, each hung up once its first frame shows, before
the watched run; first_frame_ms_runs holds every run's time from page load to first frame.

With --agent SENTENCE the page opens an agent session (its fake microphone plays silence),
watches the idle avatar for --idle-s, then has the gateway's speech API say SENTENCE (a WAV
from espeak-ng, as an application would send its TTS's audio) and, with --interrupt-after
S, interrupts it S seconds later; the JSON then also holds the page's voice levels, the
events of its data channel, and when (in page time) each call was made:

  python browser_check.py --url http://127.0.0.1:8021 --avatar browser --agent "Hello." \
      --probe 200,180,60,30 --idle-s 2 --interrupt-after 1.5 --seconds 6
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service


# Chromium and chromedriver leave their profile and singleton directories in TMPDIR when a
# run ends abruptly; theirs is one this process removes when it exits.
_SCRATCH = tempfile.TemporaryDirectory(prefix="framecast-chromium-", ignore_cleanup_errors=True)


def browser(wav):
    os.environ["TMPDIR"] = _SCRATCH.name
    o = Options()
    o.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1100,900",
    ):
        o.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)


def wait_for(driver, script, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    state = driver.execute_script("return [window.framecast.state, window.framecast.error]")
    raise SystemExit(f"browser_check: {what} within {timeout} s (page state {state})")


def session_url(driver, args):
    """The session's URL: the gateway's Location, absolute (RFC 9725) or a path."""
    s = driver.execute_script("return window.framecast.session")
    return s if s.startswith("http") else args.url + s


def run(driver, args, page):
    token = getattr(args, "token", None)
    if token and "autostart=" in page:
        # The token is typed into the page before it starts (never put in its URL).
        how = page.split("autostart=")[1].split("&")[0]
        driver.get(page.replace(f"autostart={how}", "autostart_off=1"))
        wait_for(driver, "return document.readyState === 'complete'", 30, "no page")
        driver.execute_script(
            "document.getElementById('token').value = arguments[0]; start(arguments[1])",
            token, how == "sample")
    else:
        driver.get(page)
    wait_for(driver, "return window.framecast.state === 'connected'", 30, "no connection")
    wait_for(driver, "return window.framecast.firstFrameMs", 30, "no video frame")
    # From page load (navigation start) to the first frame presented.
    return driver.execute_script("return window.framecast.firstFramePageMs")


def speech_wav(sentence, directory):
    """The sentence (espeak-ng) and three seconds of silence as one WAV: (path, speech s)."""
    spoken = os.path.join(directory, "spoken.wav")
    subprocess.run(["espeak-ng", "-w", spoken, sentence], check=True)
    with wave.open(spoken) as r:
        params, data = r.getparams(), r.readframes(r.getnframes())
    path = os.path.join(directory, "talk.wav")
    with wave.open(path, "wb") as w:
        w.setparams(params)
        w.writeframes(data + b"\0" * params.sampwidth * params.framerate * 3)
    return path, params.nframes / params.framerate


def silence_wav(directory, seconds=3):
    path = os.path.join(directory, "silence.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0" * 2 * 16000 * seconds)
    return path


def post(url, body, content_type, token):
    headers = {"Content-Type": content_type}
    if token:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, r.read().decode()


def now_ms(driver):
    return driver.execute_script("return performance.now()")


def playout(driver):
    """[page ms, seconds of playout delay in all, samples played] from the browser's
    media-playout statistics: how long the voice takes from its jitter buffer to the audio
    device, the part of the voice's delay the page's clocks do not see (None if absent)."""
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        pc.getStats().then((r) => {
          for (const s of r.values()) {
            if (s.type === "media-playout") {
              return done([performance.now(), s.totalPlayoutDelay, s.totalSamplesCount]);
            }
          }
          done(null);
        }).catch(() => done(null));""")


def playout_ms(samples, t0, t1):
    """The mean playout delay (ms) of the voice played over [t0, t1), from `playout` samples."""
    inside = [s for s in samples if s and t0 <= s[0] <= t1]
    if len(inside) < 2 or inside[-1][2] == inside[0][2]:
        return None
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][2] - inside[0][2]) * 1000, 1)


def agent(driver, args, scratch):
    """The agent run: idle, then the sentence through the speech API (and the interrupt)."""
    page = f"{args.url}/?avatar={args.avatar}&mode=agent&autostart=1&probe={args.probe}"
    run(driver, args, page)
    time.sleep(args.idle_s)
    session = session_url(driver, args)
    spoken = os.path.join(scratch, "spoken.wav")
    subprocess.run(["espeak-ng", "-w", spoken, args.agent], check=True)
    with open(spoken, "rb") as f:
        wav = f.read()
    with wave.open(spoken) as r:
        speech_s = r.getnframes() / r.getframerate()
    calls = {"say_ms": now_ms(driver)}
    status, body = post(session + "/speech", wav, "audio/wav", args.token)
    calls["say_answered_ms"] = now_ms(driver)
    calls["say"] = [status, body]
    if args.interrupt_after is not None:
        time.sleep(args.interrupt_after)
        calls["interrupt_ms"] = now_ms(driver)
        calls["interrupt"] = list(post(session + "/interrupt", b"", "text/plain", args.token))
    time.sleep(args.seconds)
    fc = driver.execute_script(
        """const f = window.framecast;
           return {state: f.state, error: f.error, frames: f.frames, probe: f.probeLuma,
                   voice: f.voiceLevels, events: f.events, video: f.stats.video || null};"""
    )
    fc["gateway"] = driver.execute_script(
        "return fetch(window.framecast.session).then(r => r.json())"
    )
    if args.screenshot:
        driver.save_screenshot(args.screenshot)
    driver.execute_script("return hangup()")
    fc.update(calls)
    fc["speech_s"] = speech_s
    return fc


def cpu_s(pids):
    """CPU seconds (user + system) each process has used so far."""
    tck = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tck)
    return out


def first_after(series, t, test):
    return next((pt for (pt, v) in series if pt > t and test(v)), None)


def settled_after(series, t, test, span_ms=400):
    """The first time after t from which every value for span_ms passes test."""
    points = [(pt, v) for (pt, v) in series if pt > t]
    for i, (pt, _) in enumerate(points):
        window = [v for (qt, v) in points[i:] if qt <= pt + span_ms]
        if window and all(test(v) for v in window) and points[-1][0] >= pt + span_ms:
            return pt
    return None


def clock_offset_ms(video, voice, t0, t1):
    """Lips-to-voice offset over [t0, t1), ms (+: the frames of a moment shown after its
    voice is played): from the RTP clocks of both tracks where the page plays them (the
    gateway stamps them from one session clock), median of each track's (page time - media
    time). None without samples."""
    def lag(series, hz):
        if not series:
            return None
        base, prev, wraps, out = series[0][1], series[0][1], 0, []
        for (t, rtp, *_) in series:
            if rtp < prev - (1 << 31):
                wraps += 1
            prev = rtp
            if t0 <= t < t1:
                out.append(t - (rtp + (wraps << 32)) * 1000.0 / hz)
        out.sort()
        return out[len(out) // 2] if out else None
    v, a = lag(video, 90000), lag(voice, 48000)
    return None if v is None or a is None else round(v - a, 1)


def content_lag_ms(probe, voice, t0, t1):
    """The lag (ms, +: the mouth after the voice) that best lines up the mouth's luma with the
    voice's level where the page plays it: the transport's offset plus the model's own (a
    Wav2Lip-style window of the 200 ms from a frame's time opens the mouth early)."""
    grid = [t0 + 10 * i for i in range(int((t1 - t0) / 10))]
    def sample(series):
        out, j = [], 0
        for t in grid:
            while j + 1 < len(series) and series[j + 1][0] <= t:
                j += 1
            out.append(series[j][1] if series else 0.0)
        return out
    a, b = sample(voice), sample(probe)
    def norm(x):
        m = sum(x) / len(x)
        d = [v - m for v in x]
        n = math.sqrt(sum(v * v for v in d)) or 1.0
        return [v / n for v in d]
    a, b = norm(a), norm(b)
    best = max(range(-30, 31), key=lambda k: abs(sum(a[i] * b[i + k] for i in range(max(0, -k), min(len(a), len(b) - k)))))
    return best * 10


def bench(driver, args, scratch):
    """Agent-session figures: speech call to the first moving mouth (audio and text),
    interrupt to a still mouth and a silent voice, CPU idle against speaking, and a long
    session's lips-to-voice offset at its start and its end and its frames lost."""
    page = f"{args.url}/?avatar={args.avatar}&mode=agent&autostart=1&probe={args.probe}"
    run(driver, args, page)
    time.sleep(2)
    session = session_url(driver, args)
    spoken = os.path.join(scratch, "spoken.wav")
    subprocess.run(["espeak-ng", "-w", spoken, args.bench], check=True)
    with open(spoken, "rb") as f:
        wav = f.read()
    fc = lambda what: driver.execute_script(f"return window.framecast.{what}")
    idle_luma = lambda: fc("probeLuma")[-1][1]
    results = {"audio_to_mouth_ms": [], "text_to_mouth_ms": [], "interrupt_to_still_ms": [],
               "interrupt_to_silence_ms": []}
    t_first = now_ms(driver)
    plays = [playout(driver)]
    for cycle in range(args.cycles):
        text = cycle % 2 == 1
        still = idle_luma()
        t = now_ms(driver)
        if text:
            post(session + "/speech", args.bench.encode(), "text/plain", args.token)
        else:
            post(session + "/speech", wav, "audio/wav", args.token)
        time.sleep(1.5)
        moved = first_after(fc("probeLuma"), t, lambda v: abs(v - still) > 4)
        key = "text_to_mouth_ms" if text else "audio_to_mouth_ms"
        if moved is not None:
            results[key].append(moved - t)
        cut = now_ms(driver)
        post(session + "/interrupt", b"", "text/plain", args.token)
        time.sleep(1.5)
        s = settled_after(fc("probeLuma"), cut, lambda v: abs(v - still) <= 1.5)
        q = settled_after(fc("voiceLevels"), cut, lambda v: v < 0.005)
        if s is not None:
            results["interrupt_to_still_ms"].append(s - cut)
        if q is not None:
            results["interrupt_to_silence_ms"].append(q - cut)
        time.sleep(0.5)
        plays.append(playout(driver))
    # CPU of the services, idle and speaking, over the same span each.
    pids = args.cpu_pids
    if pids:
        c0 = cpu_s(pids)
        time.sleep(args.cpu_s)
        c1 = cpu_s(pids)
        plays.append(playout(driver))
        for _ in range(int(args.cpu_s // 3) + 2):
            post(session + "/speech", wav, "audio/wav", args.token)
        c2 = cpu_s(pids)
        time.sleep(args.cpu_s)
        c3 = cpu_s(pids)
        plays.append(playout(driver))
        post(session + "/interrupt", b"", "text/plain", args.token)
        results["cpu_idle_s"] = [b - a for a, b in zip(c0, c1)]
        results["cpu_speaking_s"] = [b - a for a, b in zip(c2, c3)]
        results["cpu_span_s"] = args.cpu_s
    # A long session: the sentence again and again; the offset at its start and its end.
    if args.long_s:
        t_start = now_ms(driver)
        deadline = time.time() + args.long_s
        while time.time() < deadline:
            post(session + "/speech", wav, "audio/wav", args.token)
            time.sleep(4)
            plays.append(playout(driver))
        t_end = now_ms(driver)
        probe, voice = fc("probeLuma"), fc("voiceLevels")
        video_clock, voice_clock = fc("videoClock"), fc("voiceClock")
        start, end = (t_start + 2000, t_start + 22000), (t_end - 22000, t_end - 2000)
        results["offset_start_ms"] = clock_offset_ms(video_clock, voice_clock, *start)
        results["offset_end_ms"] = clock_offset_ms(video_clock, voice_clock, *end)
        results["playout_start_ms"] = playout_ms(plays, *start)
        results["playout_end_ms"] = playout_ms(plays, *end)
        results["content_lag_start_ms"] = content_lag_ms(probe, voice, *start)
        results["content_lag_end_ms"] = content_lag_ms(probe, voice, *end)
        results["long_s"] = args.long_s
    # The offset through the session, 10 s at a time (the cycles, the CPU spans, the long
    # session): [seconds from the first cycle, ms].
    video_clock, voice_clock = fc("videoClock"), fc("voiceClock")
    end = now_ms(driver)
    def held_ms(t0, t1):
        """The browser's own time for the frames shown in [t0, t1): received to shown, median."""
        v = sorted(p - r for (p, _, r) in video_clock if t0 <= p < t1 and r)
        return round(v[len(v) // 2], 1) if v else None
    plays.append(playout(driver))
    results["offset_timeline"] = [
        [round((t - t_first) / 1000), clock_offset_ms(video_clock, voice_clock, t, t + 10000),
         held_ms(t, t + 10000), playout_ms(plays, t - 5000, t + 15000)]
        for t in range(int(t_first), int(end) - 10000, 10000)
    ]
    results["gateway"] = driver.execute_script(
        "return fetch(window.framecast.session).then(r => r.json())"
    )
    driver.execute_script("return hangup()")
    return results


def mouth_latencies(onsets, probe):
    """Per speech onset in the voice sent: ms until the mouth first moves on screen (its
    luma leaves the still value it had just before the onset by more than 4). Onsets before
    the video has run for a second (nothing to compare with yet) are left out, and so are
    onsets with the mouth still moving just before them (a pause inside the sentence shorter
    than the latency: the first move after it is the previous words', not theirs)."""
    out = []
    start = probe[0][0] + 1000 if probe else float("inf")
    for t in onsets:
        if t < start:
            continue
        before = [l for (pt, l) in probe if t - 300 <= pt <= t]
        if not before:
            continue
        if max(before) - min(before) > 4:
            continue
        still = sorted(before)[len(before) // 2]
        moved = next((pt for (pt, l) in probe if pt > t and abs(l - still) > 4), None)
        if moved is not None and moved - t < 5000:
            out.append(moved - t)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--avatar", required=True)
    voice = p.add_mutually_exclusive_group(required=True)
    voice.add_argument("--wav", help="what the fake microphone plays (looped)")
    voice.add_argument("--sentence", help="speak this, then 3 s of silence (looped)")
    voice.add_argument("--agent", help="an agent session: the speech API says this")
    voice.add_argument("--bench", help="agent-session figures, saying this sentence")
    p.add_argument("--cycles", type=int, default=10, help="bench: say/interrupt cycles")
    p.add_argument("--cpu-pids", type=int, nargs="*", default=[], help="bench: processes to time")
    p.add_argument("--cpu-s", type=float, default=20, help="bench: seconds idle, then speaking")
    p.add_argument("--long-s", type=float, default=0, help="bench: a long session's seconds")
    p.add_argument("--idle-s", type=float, default=2, help="agent: idle before speaking")
    p.add_argument("--interrupt-after", type=float, help="agent: interrupt after S seconds")
    p.add_argument("--token", help="agent: the gateway's --api-token")
    p.add_argument("--probe", required=True, help="x,y,w,h in video pixels")
    p.add_argument("--seconds", type=float, default=22)
    p.add_argument("--screenshot")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--relay", action="store_true", help="media through the gateway's TURN servers only")
    p.add_argument("--codec", choices=["vp8", "h264"], help="offer this video codec only")
    args = p.parse_args()
    page = f"{args.url}/?avatar={args.avatar}&autostart=1&probe={args.probe}"
    if args.relay:
        page += "&relay=1"
    if args.codec:
        page += f"&codec={args.codec}"
    scratch = tempfile.TemporaryDirectory()
    wav, speech_s = (args.wav, None)
    if args.sentence:
        wav, speech_s = speech_wav(args.sentence, scratch.name)
    if args.agent or args.bench:
        driver = browser(silence_wav(scratch.name))
        try:
            run_it = agent if args.agent else bench
            json.dump(run_it(driver, args, scratch.name), sys.stdout)
        finally:
            driver.quit()
        return
    driver = browser(wav)
    try:
        firsts = []
        for _ in range(args.runs - 1):
            firsts.append(run(driver, args, page))
            driver.execute_script("return hangup()")
        firsts.append(run(driver, args, page))
        time.sleep(args.seconds)
        fc = driver.execute_script(
            """const f = window.framecast;
               return {state: f.state, error: f.error, session: f.session,
                       first_frame_ms: f.firstFrameMs, frames: f.frames,
                       probe: f.probeLuma, onsets: f.onsets, video: f.stats.video || null,
                       rtt_ms: f.stats.rttMs || null, page_fps: f.stats.fps || null,
                       local_candidate: f.stats.localCandidate || null,
                       codec: f.stats.codec || null,
                       latency: document.getElementById("latency").textContent,
                       rtt: document.getElementById("rtt").textContent,
                       fps_shown: document.getElementById("fps").textContent};"""
        )
        gateway = driver.execute_script(
            "return fetch(window.framecast.session).then(r => r.json())"
        )
        if args.screenshot:
            driver.save_screenshot(args.screenshot)
        driver.execute_script("return hangup()")
        fc["first_frame_ms_runs"] = firsts
        fc["speech_s"] = speech_s
        fc["mouth_latency_ms"] = mouth_latencies(fc["onsets"], fc["probe"])
        fc["gateway"] = gateway
        json.dump(fc, sys.stdout)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
