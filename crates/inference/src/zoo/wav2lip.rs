//! Wav2Lip's generator (Rudrabha/Wav2Lip, `models/wav2lip.py`) rebuilt layer for layer with
//! `tch::nn`: the face encoder (96 px down to 1x1 in 7 blocks), the audio encoder (13 blocks,
//! a mel window to 512 channels), the decoder (transposed convolutions, each block joined to
//! the face encoder's block of its size) and the sigmoid output. Seeded weights, not
//! trained: it stands for a user's exported Wav2Lip in the compatibility test, where the
//! contract (names, shapes, ranges, colour order, masked half first) is what is under test.
//! Its `forward(mel: [B,1,80,16], face: [B,6,96,96])` takes the face in \[0, 1\], BGR, the
//! masked crop first, and returns `[B,3,96,96]` in \[0, 1\], BGR, as Wav2Lip's `inference.py`
//! feeds it.

use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Wav2Lip's crop size, fixed by its architecture.
pub const CROP: i64 = 96;

/// One block of Wav2Lip's encoders: conv, batch norm, then ReLU, the input added before the
/// ReLU in residual blocks.
pub(super) fn wav2lip_conv(
    p: nn::Path,
    cin: i64,
    cout: i64,
    kernel: i64,
    stride: [i64; 2],
    padding: i64,
    residual: bool,
) -> nn::FuncT<'static> {
    let config = nn::ConvConfigND::<[i64; 2]> {
        stride,
        padding: [padding, padding],
        ..Default::default()
    };
    let conv = nn::conv(&p / "conv", cin, cout, [kernel, kernel], config);
    let bn = nn::batch_norm2d(&p / "bn", cout, Default::default());
    nn::func_t(move |x, train| {
        let y = x.apply(&conv).apply_t(&bn, train);
        if residual {
            (y + x).relu()
        } else {
            y.relu()
        }
    })
}

/// Wav2Lip's audio encoder: `[B,1,80,16]` mel windows to `[B,512,1,1]`.
pub(super) fn audio_encoder(p: &nn::Path) -> nn::SequentialT {
    let layers: [(i64, i64, i64, [i64; 2], i64, bool); 13] = [
        (1, 32, 3, [1, 1], 1, false),
        (32, 32, 3, [1, 1], 1, true),
        (32, 32, 3, [1, 1], 1, true),
        (32, 64, 3, [3, 1], 1, false),
        (64, 64, 3, [1, 1], 1, true),
        (64, 64, 3, [1, 1], 1, true),
        (64, 128, 3, [3, 3], 1, false),
        (128, 128, 3, [1, 1], 1, true),
        (128, 128, 3, [1, 1], 1, true),
        (128, 256, 3, [3, 2], 1, false),
        (256, 256, 3, [1, 1], 1, true),
        (256, 512, 3, [1, 1], 0, false),
        (512, 512, 1, [1, 1], 0, false),
    ];
    let mut seq = nn::seq_t();
    for (i, (cin, cout, k, stride, pad, residual)) in layers.into_iter().enumerate() {
        seq = seq.add(wav2lip_conv(
            p / format!("a{i}"),
            cin,
            cout,
            k,
            stride,
            pad,
            residual,
        ));
    }
    seq
}

/// One block of Wav2Lip's decoder: transposed conv, batch norm, ReLU.
fn wav2lip_conv_t(
    p: nn::Path,
    cin: i64,
    cout: i64,
    kernel: i64,
    stride: i64,
    padding: i64,
    output_padding: i64,
) -> nn::FuncT<'static> {
    let config = nn::ConvTransposeConfig {
        stride,
        padding,
        output_padding,
        ..Default::default()
    };
    let conv = nn::conv_transpose2d(&p / "conv", cin, cout, kernel, config);
    let bn = nn::batch_norm2d(&p / "bn", cout, Default::default());
    nn::func_t(move |x, train| x.apply(&conv).apply_t(&bn, train).relu())
}

/// The generator.
pub struct Wav2Lip {
    face_encoder: Vec<nn::SequentialT>,
    audio_encoder: nn::SequentialT,
    face_decoder: Vec<nn::SequentialT>,
    output: nn::SequentialT,
}

impl Wav2Lip {
    pub fn new(p: &nn::Path) -> Self {
        let c = |p: nn::Path, cin, cout, k, s: i64, pad, res| {
            wav2lip_conv(p, cin, cout, k, [s, s], pad, res)
        };
        // (in, out, residual blocks after the first) per encoder block; the first is a 7x7.
        let mut face_encoder = vec![nn::seq_t().add(c(p / "e0" / "0", 6, 16, 7, 1, 3, false))];
        for (i, (cin, cout, residuals)) in [
            (16, 32, 2),
            (32, 64, 3),
            (64, 128, 2),
            (128, 256, 2),
            (256, 512, 1),
        ]
        .into_iter()
        .enumerate()
        {
            let q = p / format!("e{}", i + 1);
            let mut block = nn::seq_t().add(c(&q / "0", cin, cout, 3, 2, 1, false));
            for r in 0..residuals {
                block = block.add(c(&q / format!("{}", r + 1), cout, cout, 3, 1, 1, true));
            }
            face_encoder.push(block);
        }
        face_encoder.push(
            nn::seq_t()
                .add(c(p / "e6" / "0", 512, 512, 3, 1, 0, false))
                .add(c(p / "e6" / "1", 512, 512, 1, 1, 0, false)),
        );
        let mut face_decoder = vec![nn::seq_t().add(c(p / "d0" / "0", 512, 512, 1, 1, 0, false))];
        // (in, out, kernel, stride, padding, output padding, residual blocks).
        for (i, (cin, cout, k, s, pad, opad, residuals)) in [
            (1024, 512, 3, 1, 0, 0, 1),
            (1024, 512, 3, 2, 1, 1, 2),
            (768, 384, 3, 2, 1, 1, 2),
            (512, 256, 3, 2, 1, 1, 2),
            (320, 128, 3, 2, 1, 1, 2),
            (160, 64, 3, 2, 1, 1, 2),
        ]
        .into_iter()
        .enumerate()
        {
            let q = p / format!("d{}", i + 1);
            let mut block = nn::seq_t().add(wav2lip_conv_t(&q / "0", cin, cout, k, s, pad, opad));
            for r in 0..residuals {
                block = block.add(c(&q / format!("{}", r + 1), cout, cout, 3, 1, 1, true));
            }
            face_decoder.push(block);
        }
        let output = nn::seq_t()
            .add(c(p / "out" / "0", 80, 32, 3, 1, 1, false))
            .add(nn::conv2d(p / "out" / "1", 32, 3, 1, Default::default()))
            .add_fn(|x| x.sigmoid());
        Wav2Lip {
            face_encoder,
            audio_encoder: audio_encoder(&(p / "audio")),
            face_decoder,
            output,
        }
    }

    pub fn forward(&self, mel: &Tensor, face: &Tensor) -> Tensor {
        let mut feats = Vec::with_capacity(self.face_encoder.len());
        let mut x = face.shallow_clone();
        for block in &self.face_encoder {
            x = block.forward_t(&x, false);
            feats.push(x.shallow_clone());
        }
        let mut x = self.audio_encoder.forward_t(mel, false);
        for block in &self.face_decoder {
            x = block.forward_t(&x, false);
            let skip = feats.pop().expect("one encoder block per decoder block");
            x = Tensor::cat(&[x, skip], 1);
        }
        self.output.forward_t(&x, false)
    }
}
