//! Flat buffers over a list of tensors (a model's gradients or parameters), in a fixed order
//! that is the same on every rank: one collective per bucket instead of one per tensor.
use tch::{Kind, Tensor};

/// Where each tensor of a list lives in one flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatLayout {
    /// Element count of each tensor.
    pub sizes: Vec<usize>,
    /// Offset of each tensor in the flat vector.
    pub offsets: Vec<usize>,
    /// Total elements.
    pub total: usize,
}

impl FlatLayout {
    /// The layout of `tensors`, back to back in the given order.
    pub fn new(tensors: &[Tensor]) -> Self {
        let sizes: Vec<usize> = tensors.iter().map(Tensor::numel).collect();
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut total = 0;
        for size in &sizes {
            offsets.push(total);
            total += size;
        }
        Self {
            sizes,
            offsets,
            total,
        }
    }

    /// Index ranges of consecutive tensors whose sizes add up to at most `bucket_elements`
    /// (a larger tensor gets a bucket of its own).
    pub fn buckets(&self, bucket_elements: usize) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let (mut start, mut filled) = (0, 0);
        for (i, size) in self.sizes.iter().enumerate() {
            if i > start && filled + size > bucket_elements {
                out.push(start..i);
                start = i;
                filled = 0;
            }
            filled += size;
        }
        if start < self.sizes.len() {
            out.push(start..self.sizes.len());
        }
        out
    }

    /// `total` rounded up to a multiple of `world`: the length of a buffer that splits into
    /// equal shards.
    pub fn padded(&self, world: usize) -> usize {
        self.total.div_ceil(world) * world
    }
}

/// Copies `tensors[range]` into one flat `kind` vector of `len ≥ their total` elements
/// (the tail is zero); an undefined tensor (a parameter without gradient) counts as zeros.
pub fn flatten(
    tensors: &[Tensor],
    range: std::ops::Range<usize>,
    len: usize,
    kind: Kind,
) -> Tensor {
    let device = tensors
        .get(range.start)
        .filter(|t| t.defined())
        .map_or(tch::Device::Cpu, Tensor::device);
    let flat = Tensor::zeros([len as i64], (kind, device));
    let mut offset = 0i64;
    for t in &tensors[range] {
        if t.defined() {
            let n = t.numel() as i64;
            flat.narrow(0, offset, n).copy_(&t.reshape(-1));
            offset += n;
        }
    }
    flat
}

/// Copies consecutive pieces of `flat` back into `tensors[range]` (converting dtype); an
/// undefined tensor is skipped, its elements included.
pub fn unflatten(flat: &Tensor, tensors: &mut [Tensor], range: std::ops::Range<usize>) {
    let mut offset = 0i64;
    for t in &mut tensors[range] {
        if t.defined() {
            let n = t.numel() as i64;
            let piece = flat.narrow(0, offset, n).view_(t.size());
            t.copy_(&piece);
            offset += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_buckets() {
        let a = Tensor::from_slice(&[1f32, 2., 3., 4.]).view([2, 2]);
        let b = Tensor::from_slice(&[5f32]);
        let c = Tensor::from_slice(&[6f32, 7., 8.]);
        let tensors = vec![a, b, c];
        let layout = FlatLayout::new(&tensors);
        assert_eq!((layout.offsets.clone(), layout.total), (vec![0, 4, 5], 8));
        assert_eq!(layout.buckets(5), vec![0..2, 2..3]);
        assert_eq!(layout.buckets(3), vec![0..1, 1..2, 2..3]);
        assert_eq!(layout.padded(3), 9);
        let flat = flatten(&tensors, 0..3, 9, Kind::Float);
        assert_eq!(
            Vec::<f32>::try_from(&flat).unwrap(),
            vec![1., 2., 3., 4., 5., 6., 7., 8., 0.]
        );
        let mut out: Vec<Tensor> = tensors.iter().map(Tensor::zeros_like).collect();
        unflatten(&(flat * 2.0), &mut out, 0..3);
        assert_eq!(
            Vec::<f32>::try_from(&out[0].view(-1)).unwrap(),
            vec![2., 4., 6., 8.]
        );
        assert_eq!(Vec::<f32>::try_from(&out[2]).unwrap(), vec![12., 14., 16.]);
    }
}
