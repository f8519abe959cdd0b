#!/usr/bin/env python3
"""The reference the mel front end (crates/audio) is tested against: librosa 0.11.

    mel IN.f32 OUT.f32        16 kHz f32le samples -> the Wav2Lip log-mel spectrogram,
                              frames x 80 f32le, computed in float64 with librosa
    resample IN.wav RATE OUT.wav
                              IN resampled to RATE with librosa (soxr_hq), written s16le
    load16 IN.wav OUT.f32     IN as librosa.load(sr=16000) gives it (soxr_hq), f32le

Run with the Python of the venv scripts/setup.sh prepares (FRAMECAST_REFERENCE_PYTHON).
"""
import sys

import librosa
import numpy as np
import scipy.signal
import soundfile


def wav2lip_mel(y):
    y = scipy.signal.lfilter([1, -0.97], [1], y)
    spec = librosa.stft(y=y, n_fft=800, hop_length=200, win_length=800, center=True,
                        pad_mode="reflect")
    basis = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600,
                                dtype=np.float64)
    mel = basis @ np.abs(spec)
    db = 20 * np.log10(np.maximum(1e-5, mel)) - 20
    return np.clip(8 * ((db + 100) / 100) - 4, -4, 4)


def main(argv):
    cmd = argv[1]
    if cmd == "mel":
        y = np.fromfile(argv[2], dtype="<f4").astype(np.float64)
        wav2lip_mel(y).T.astype("<f4").tofile(argv[3])
    elif cmd == "resample":
        y, sr = librosa.load(argv[2], sr=None, mono=True)
        rate = int(argv[3])
        out = librosa.resample(y, orig_sr=sr, target_sr=rate, res_type="soxr_hq")
        soundfile.write(argv[4], out, rate, subtype="PCM_16")
    elif cmd == "load16":
        y, _ = librosa.load(argv[2], sr=16000, mono=True)
        y.astype("<f4").tofile(argv[3])
    else:
        sys.exit(f"unknown command {cmd!r}; see --help")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    main(sys.argv)
