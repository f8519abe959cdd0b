"""A small voice agent on a framecast agent session: the whole loop of a voice assistant,
without an ASR or an LLM.

It listens to the user on the session's microphone WebSocket (16 kHz, 16-bit mono PCM),
finds the end of each of the user's turns by energy (speech, then --end-of-turn seconds of
quiet), and answers through the speech API, saying how long the user spoke. When the user
starts talking again while the avatar speaks, it cuts the avatar off (barge-in: the
interrupt call). The session's events (server-sent events) tell it when the avatar is
speaking.

  python examples/voice_agent.py --gateway 127.0.0.1:8021 --session /sessions/ID [--token T]

Where an ASR and an LLM plug in (docs/frontend.md, "A voice agent"): `on_turn` gets the
turn's audio; transcribe it there, ask the LLM, and `say` its answer (text for the gateway's
TTS, or your TTS's audio as audio/wav or audio/pcm; rate=N, streamed as it is made).
"""

import argparse
import asyncio
import json
import math
import struct
import sys
import threading
import time
import urllib.request

import websockets

RATE = 16000


class Agent:
    def __init__(self, args):
        self.base = f"http://{args.gateway}{args.session}"
        self.ws_url = f"ws://{args.gateway}{args.session}/microphone"
        self.headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        self.threshold = args.threshold
        self.end_of_turn = args.end_of_turn
        self.turns_left = args.turns
        self.speaking = set()  # the avatar's utterances playing now (from the events)
        self.events = threading.Thread(target=self.follow_events, daemon=True)

    def call(self, path, body=b"", content_type="text/plain"):
        headers = dict(self.headers, **{"Content-Type": content_type})
        req = urllib.request.Request(self.base + path, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    def say(self, text):
        reply = self.call("/speech", text.encode())
        print(f"agent: saying {text!r} (utterance {reply['id']})", flush=True)

    def follow_events(self):
        """The session's events: which of the avatar's utterances are on screen now."""
        req = urllib.request.Request(self.base + "/events", headers=self.headers)
        with urllib.request.urlopen(req) as r:
            for line in r:
                if not line.startswith(b"data:"):
                    continue
                e = json.loads(line[5:])
                if e["type"] == "utterance_started":
                    self.speaking.add(e["id"])
                elif e["type"] == "utterance_ended":
                    self.speaking.discard(e["id"])
                print(f"event: {json.dumps(e)}", flush=True)
                if e["type"] == "session_closed":
                    return

    def on_turn(self, seconds, pcm):
        """The user's turn is over: answer it (an ASR and an LLM would go here)."""
        self.say(f"You spoke for {seconds:.1f} seconds.")
        self.turns_left -= 1

    async def run(self):
        self.events.start()
        turn_start = quiet_since = None
        turn = bytearray()
        async with websockets.connect(self.ws_url, additional_headers=self.headers) as ws:
            async for message in ws:
                now = time.monotonic()
                samples = struct.unpack(f"<{len(message) // 2}h", message)
                rms = math.sqrt(sum(s * s for s in samples) / max(len(samples), 1)) / 32768
                if rms > self.threshold:
                    if turn_start is None:
                        turn_start = now
                        print(f"user: speaking (level {rms:.3f})", flush=True)
                        if self.speaking:
                            # Barge-in: the user talks over the avatar; it stops at once.
                            reply = self.call("/interrupt")
                            print(f"agent: interrupted {reply['interrupted']}", flush=True)
                    quiet_since = None
                    turn.extend(message)
                elif turn_start is not None:
                    quiet_since = quiet_since or now
                    turn.extend(message)
                    if now - quiet_since >= self.end_of_turn:
                        self.on_turn(quiet_since - turn_start, bytes(turn))
                        turn_start = quiet_since = None
                        turn.clear()
                        if self.turns_left == 0:
                            return


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gateway", required=True, help="host:port of framecast-gateway")
    p.add_argument("--session", required=True, help="the session's path, /sessions/ID")
    p.add_argument("--token", help="the gateway's --api-token")
    p.add_argument("--threshold", type=float, default=0.02, help="speech level (RMS, 0..1)")
    p.add_argument("--end-of-turn", type=float, default=0.8, help="seconds of quiet ending a turn")
    p.add_argument("--turns", type=int, default=-1, help="answer this many turns, then exit")
    args = p.parse_args()
    try:
        asyncio.run(Agent(args).run())
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
