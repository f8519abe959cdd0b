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


def browser(wav):
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


def run(driver, args, page):
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


def agent(driver, args, scratch):
    """The agent run: idle, then the sentence through the speech API (and the interrupt)."""
    page = f"{args.url}/?avatar={args.avatar}&mode=agent&autostart=1&probe={args.probe}"
    run(driver, args, page)
    time.sleep(args.idle_s)
    session = args.url + driver.execute_script("return window.framecast.session")
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
    p.add_argument("--idle-s", type=float, default=2, help="agent: idle before speaking")
    p.add_argument("--interrupt-after", type=float, help="agent: interrupt after S seconds")
    p.add_argument("--token", help="agent: the gateway's --api-token")
    p.add_argument("--probe", required=True, help="x,y,w,h in video pixels")
    p.add_argument("--seconds", type=float, default=22)
    p.add_argument("--screenshot")
    p.add_argument("--runs", type=int, default=1)
    args = p.parse_args()
    page = f"{args.url}/?avatar={args.avatar}&autostart=1&probe={args.probe}"
    scratch = tempfile.TemporaryDirectory()
    wav, speech_s = (args.wav, None)
    if args.sentence:
        wav, speech_s = speech_wav(args.sentence, scratch.name)
    if args.agent:
        driver = browser(silence_wav(scratch.name))
        try:
            json.dump(agent(driver, args, scratch.name), sys.stdout)
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
                       rtt_ms: f.stats.rttMs || null};"""
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
