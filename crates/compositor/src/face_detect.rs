//! Frontal faces in a grey image: OpenCV's Haar cascade algorithm (Viola-Jones with
//! Lienhart's features) evaluated in Rust over OpenCV's own trained cascade, the
//! `haarcascade_frontalface_default.xml` Debian's `opencv-data` package installs. The weights
//! come from that package; nothing is downloaded. `docs/models.md` says why this detector.
//!
//! [`Cascade::detect`] follows `cv::CascadeClassifier::detectMultiScale` for stump cascades:
//! the image is shrunk by `scale` per level, every window of the cascade's size is tried (a
//! step of 2 below a scale of 2, with one more step after a window the first stage rejects),
//! each window's features are normalised by its standard deviation (flat windows are skipped),
//! and the hits are grouped as `cv::groupRectangles` does (eps 0.2, more than `min_neighbors`
//! hits per group).

use std::path::Path;

/// Where Debian's `opencv-data` puts the cascade.
pub const DEFAULT_CASCADE: &str =
    "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml";

/// A face found: its box in image pixels and how many raw hits it grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Face {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
    pub hits: u32,
}

struct Weak {
    feature: usize,
    threshold: f64,
    left: f64,
    right: f64,
}

struct Stage {
    threshold: f64,
    weak: Vec<Weak>,
}

/// Rectangles of a feature: (x, y, w, h, weight) in the cascade's window.
type Feature = Vec<(usize, usize, usize, usize, f64)>;

/// A trained cascade.
pub struct Cascade {
    width: usize,
    height: usize,
    stages: Vec<Stage>,
    features: Vec<Feature>,
}

/// Text of every `<tag>...</tag>` in `s`, in order.
fn all<'a>(s: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn numbers(s: &str, what: &str) -> Result<Vec<f64>, String> {
    s.split_whitespace()
        .map(|v| {
            v.parse::<f64>()
                .map_err(|_| format!("{what}: {v:?} is not a number"))
        })
        .collect()
}

impl Cascade {
    /// Reads an OpenCV cascade file (the XML format of OpenCV 2.4 and later, stump trees,
    /// HAAR features without tilted ones).
    pub fn load(path: &Path) -> Result<Cascade, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("face cascade {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("face cascade {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Cascade, String> {
        let one = |tag: &str| -> Result<usize, String> {
            all(text, tag)
                .first()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| format!("no <{tag}>"))
        };
        if !text.contains("<featureType>HAAR</featureType>") {
            return Err("not a HAAR cascade".into());
        }
        let (width, height) = (one("width")?, one("height")?);
        if !(2..=64).contains(&width) || !(2..=64).contains(&height) {
            return Err(format!("window {width}x{height} is out of range"));
        }
        let stages_text = all(text, "stages")
            .into_iter()
            .next()
            .ok_or("no <stages>")?;
        let mut stages = Vec::new();
        for stage in stages_text.split("<stageThreshold>").skip(1) {
            let threshold = numbers(stage.split('<').next().unwrap_or(""), "stageThreshold")?;
            let nodes = all(stage, "internalNodes");
            let leaves = all(stage, "leafValues");
            if threshold.len() != 1 || nodes.len() != leaves.len() || nodes.is_empty() {
                return Err(format!("stage {} is malformed", stages.len()));
            }
            let mut weak = Vec::with_capacity(nodes.len());
            for (n, l) in nodes.iter().zip(&leaves) {
                let n = numbers(n, "internalNodes")?;
                let l = numbers(l, "leafValues")?;
                // A stump: left -1 (leaf), right -1... [0, -1, feature, threshold].
                if n.len() != 4 || n[0] != 0.0 || n[1] != -1.0 || l.len() != 2 || n[2] < 0.0 {
                    return Err(format!(
                        "stage {}: only stump classifiers are supported",
                        stages.len()
                    ));
                }
                weak.push(Weak {
                    feature: n[2] as usize,
                    threshold: n[3],
                    left: l[0],
                    right: l[1],
                });
            }
            stages.push(Stage {
                threshold: threshold[0],
                weak,
            });
        }
        let features_text = all(text, "features")
            .into_iter()
            .next()
            .ok_or("no <features>")?;
        if features_text.contains("<tilted>1</tilted>") {
            return Err("tilted features are not supported".into());
        }
        let mut features = Vec::new();
        for rects in all(features_text, "rects") {
            let mut feature = Vec::new();
            for r in all(rects, "_") {
                let v = numbers(r, "rects")?;
                let [x, y, w, h, weight] = v[..] else {
                    return Err(format!(
                        "feature {}: a rect needs 5 numbers",
                        features.len()
                    ));
                };
                if x < 0.0 || y < 0.0 || w < 1.0 || h < 1.0 {
                    return Err(format!("feature {}: a negative rect", features.len()));
                }
                let (x, y, w, h) = (x as usize, y as usize, w as usize, h as usize);
                if x + w > width || y + h > height {
                    return Err(format!(
                        "feature {}: a rect outside the window",
                        features.len()
                    ));
                }
                feature.push((x, y, w, h, weight));
            }
            features.push(feature);
        }
        if stages.is_empty() || features.is_empty() {
            return Err("no stages or no features".into());
        }
        if stages
            .iter()
            .flat_map(|s| &s.weak)
            .any(|w| w.feature >= features.len())
        {
            return Err("a classifier names a feature that does not exist".into());
        }
        Ok(Cascade {
            width,
            height,
            stages,
            features,
        })
    }

    /// Faces in `gray` (`width` x `height`, rows end to end), windows from `min_size` pixels
    /// up, the image shrunk by `scale` per level; groups of more than `min_neighbors` hits.
    pub fn detect(
        &self,
        gray: &[u8],
        width: usize,
        height: usize,
        scale: f64,
        min_neighbors: usize,
        min_size: usize,
    ) -> Vec<Face> {
        let (cw, ch) = (self.width, self.height);
        let mut hits = Vec::new();
        let mut f = 1.0f64;
        let mut small = Vec::new();
        while gray.len() == width * height {
            let (ww, wh) = (
                (cw as f64 * f).round() as usize,
                (ch as f64 * f).round() as usize,
            );
            let (sw, sh) = (
                (width as f64 / f).round() as usize,
                (height as f64 / f).round() as usize,
            );
            if sw < cw || sh < ch {
                break;
            }
            if ww >= min_size && wh >= min_size {
                resize(gray, width, height, sw, sh, &mut small);
                let (sum, sq) = integrals(&small, sw, sh);
                let step = if f >= 2.0 { 1 } else { 2 };
                for y in (0..=sh - ch).step_by(step) {
                    let mut x = 0;
                    while x <= sw - cw {
                        let r = self.window(&sum, &sq, sw + 1, x, y);
                        if r > 0 {
                            hits.push([
                                (x as f64 * f).round() as i64,
                                (y as f64 * f).round() as i64,
                                ww as i64,
                                wh as i64,
                            ]);
                        }
                        if r == 0 {
                            x += step;
                        }
                        x += step;
                    }
                }
            }
            f *= scale;
        }
        group(&hits, min_neighbors, 0.2)
    }

    /// 1: the window passes every stage; 0: the first stage rejects it; -k: stage k does;
    /// -1 also when the window is flat (no contrast to normalise).
    fn window(&self, sum: &[f64], sq: &[f64], stride: usize, x: usize, y: usize) -> i64 {
        let rect = |s: &[f64], rx: usize, ry: usize, rw: usize, rh: usize| {
            let (x0, y0, x1, y1) = (x + rx, y + ry, x + rx + rw, y + ry + rh);
            s[y0 * stride + x0] - s[y0 * stride + x1] - s[y1 * stride + x0] + s[y1 * stride + x1]
        };
        let (nw, nh) = (self.width - 2, self.height - 2);
        let area = (nw * nh) as f64;
        let v = rect(sum, 1, 1, nw, nh);
        let q = rect(sq, 1, 1, nw, nh);
        let nf = area * q - v * v;
        if nf <= 0.0 {
            return -1;
        }
        let inv = 1.0 / nf.sqrt();
        if area * inv >= 0.1 {
            return -1;
        }
        for (k, stage) in self.stages.iter().enumerate() {
            let mut acc = 0.0;
            for w in &stage.weak {
                let value: f64 = self.features[w.feature]
                    .iter()
                    .map(|&(rx, ry, rw, rh, weight)| weight * rect(sum, rx, ry, rw, rh))
                    .sum::<f64>()
                    * inv;
                acc += if value < w.threshold { w.left } else { w.right };
            }
            if acc < stage.threshold {
                return -(k as i64);
            }
        }
        1
    }
}

/// Bilinear resize of a grey image (pixel centres aligned, as OpenCV's INTER_LINEAR).
fn resize(src: &[u8], w: usize, h: usize, dw: usize, dh: usize, out: &mut Vec<u8>) {
    out.clear();
    out.reserve(dw * dh);
    let (fx, fy) = (w as f64 / dw as f64, h as f64 / dh as f64);
    let coords = |d: usize, f: f64, n: usize| {
        let s = ((d as f64 + 0.5) * f - 0.5).clamp(0.0, (n - 1) as f64);
        let i = s.floor() as usize;
        (i, (i + 1).min(n - 1), s - i as f64)
    };
    let xs: Vec<(usize, usize, f64)> = (0..dw).map(|x| coords(x, fx, w)).collect();
    for y in 0..dh {
        let (y0, y1, ty) = coords(y, fy, h);
        let (r0, r1) = (&src[y0 * w..][..w], &src[y1 * w..][..w]);
        for &(x0, x1, tx) in &xs {
            let top = r0[x0] as f64 * (1.0 - tx) + r0[x1] as f64 * tx;
            let bottom = r1[x0] as f64 * (1.0 - tx) + r1[x1] as f64 * tx;
            out.push((top * (1.0 - ty) + bottom * ty).round() as u8);
        }
    }
}

/// Integral image and integral of squares, (w + 1) x (h + 1), a zero row and column first.
fn integrals(img: &[u8], w: usize, h: usize) -> (Vec<f64>, Vec<f64>) {
    let stride = w + 1;
    let mut sum = vec![0.0; stride * (h + 1)];
    let mut sq = vec![0.0; stride * (h + 1)];
    for y in 0..h {
        let (mut row, mut row_sq) = (0.0, 0.0);
        for x in 0..w {
            let v = img[y * w + x] as f64;
            row += v;
            row_sq += v * v;
            sum[(y + 1) * stride + x + 1] = sum[y * stride + x + 1] + row;
            sq[(y + 1) * stride + x + 1] = sq[y * stride + x + 1] + row_sq;
        }
    }
    (sum, sq)
}

/// `cv::groupRectangles`: hits that agree within `eps` of their size are one group, averaged;
/// groups of `threshold` hits or fewer go, as do groups inside a larger, better-supported one.
fn group(rects: &[[i64; 4]], threshold: usize, eps: f64) -> Vec<Face> {
    let n = rects.len();
    let mut label: Vec<usize> = (0..n).collect();
    fn find(label: &mut [usize], mut a: usize) -> usize {
        while label[a] != a {
            label[a] = label[label[a]];
            a = label[a];
        }
        a
    }
    let similar = |a: &[i64; 4], b: &[i64; 4]| {
        let d = eps * ((a[2].min(b[2]) + a[3].min(b[3])) as f64) * 0.5;
        (a[0] - b[0]).abs() as f64 <= d
            && (a[1] - b[1]).abs() as f64 <= d
            && (a[0] + a[2] - b[0] - b[2]).abs() as f64 <= d
            && (a[1] + a[3] - b[1] - b[3]).abs() as f64 <= d
    };
    for i in 0..n {
        for j in i + 1..n {
            if similar(&rects[i], &rects[j]) {
                let (a, b) = (find(&mut label, i), find(&mut label, j));
                label[a] = b;
            }
        }
    }
    let mut clusters: std::collections::BTreeMap<usize, Vec<[i64; 4]>> = Default::default();
    for (i, r) in rects.iter().enumerate() {
        let root = find(&mut label, i);
        clusters.entry(root).or_default().push(*r);
    }
    let avg: Vec<([i64; 4], usize)> = clusters
        .values()
        .map(|v| {
            let mean = |k: usize| {
                (v.iter().map(|r| r[k]).sum::<i64>() as f64 / v.len() as f64).round() as i64
            };
            ([mean(0), mean(1), mean(2), mean(3)], v.len())
        })
        .collect();
    let mut out = Vec::new();
    for (i, (r1, n1)) in avg.iter().enumerate() {
        if *n1 <= threshold {
            continue;
        }
        let inside = avg.iter().enumerate().any(|(j, (r2, n2))| {
            if j == i || *n2 <= threshold {
                return false;
            }
            let dx = (r2[2] as f64 * eps).round() as i64;
            let dy = (r2[3] as f64 * eps).round() as i64;
            r1[0] >= r2[0] - dx
                && r1[1] >= r2[1] - dy
                && r1[0] + r1[2] <= r2[0] + r2[2] + dx
                && r1[1] + r1[3] <= r2[1] + r2[3] + dy
                && (*n2 > (*n1).max(3) || *n1 < 3)
        });
        if !inside && r1.iter().all(|&v| v >= 0) {
            out.push(Face {
                x: r1[0] as u32,
                y: r1[1] as u32,
                w: r1[2] as u32,
                h: r1[3] as u32,
                hits: *n1 as u32,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser takes the format and refuses what it cannot evaluate, saying which.
    #[test]
    fn cascades_are_checked_when_read() {
        let good = "<featureType>HAAR</featureType><width>4</width><height>4</height>\
            <stages><_><stageThreshold>-1</stageThreshold><weakClassifiers><_>\
            <internalNodes>0 -1 0 0.5</internalNodes><leafValues>-1 1</leafValues></_>\
            </weakClassifiers></_></stages>\
            <features><_><rects><_>0 0 2 4 -1.</_><_>2 0 2 4 1.</_></rects></_></features>";
        let c = Cascade::parse(good).unwrap();
        assert_eq!(
            (c.width, c.height, c.stages.len(), c.features.len()),
            (4, 4, 1, 1)
        );
        for (bad, why) in [
            (good.replace("HAAR", "LBP"), "not a HAAR"),
            (good.replace("0 -1 0 0.5", "1 2 0 0.5"), "stump"),
            (
                good.replace("2 0 2 4 1.", "3 0 2 4 1."),
                "outside the window",
            ),
            (good.replace("0 -1 0 0.5", "0 -1 7 0.5"), "does not exist"),
            (good.replace("<width>4", "<width>x"), "no <width>"),
        ] {
            let e = Cascade::parse(&bad).err().unwrap();
            assert!(e.contains(why), "{e} should say {why}");
        }
    }

    /// Grouping: hits agreeing within 20% of their size are one face, averaged; a group of
    /// `threshold` hits or fewer is not a face.
    #[test]
    fn hits_group_as_opencv_groups_them() {
        let hits = [
            [100, 100, 50, 50],
            [102, 101, 50, 50],
            [98, 99, 52, 52],
            [300, 40, 50, 50],
        ];
        let faces = group(&hits, 2, 0.2);
        assert_eq!(faces.len(), 1);
        assert_eq!(
            (faces[0].x, faces[0].y, faces[0].w, faces[0].hits),
            (100, 100, 51, 3)
        );
    }
}
