//! Which response tokens count, and reductions over them. All tensors are `[B, T]`, response
//! tokens only, right-padded; a mask may be bool or float (non-zero = valid).
use tch::{Kind, Tensor};

/// The validity mask of spec §0 ([REPO] `get_eos_mask`): every generated token up to **and
/// including** the first EOS is valid, everything after it is not; a truncated response (no
/// EOS) keeps all its generated tokens; padding is never valid.
///
/// `response_ids`: `[B, T]` ids; `generated`: `[B, T]`, true on sampled tokens and false on
/// padding; `eos_ids`: every id that ends a response. Returns a `[B, T]` bool mask.
pub fn response_mask(response_ids: &Tensor, generated: &Tensor, eos_ids: &[i64]) -> Tensor {
    let generated = generated.to_kind(Kind::Bool);
    let is_eos = eos_ids
        .iter()
        .fold(generated.zeros_like(), |acc, &id| {
            acc.logical_or(&response_ids.eq(id))
        })
        .logical_and(&generated)
        .to_kind(Kind::Int64);
    // Number of EOS tokens strictly before each position: zero up to the first EOS.
    let eos_before = is_eos.cumsum(1, Kind::Int64) - &is_eos;
    eos_before.eq(0).logical_and(&generated)
}

/// `L_i`: the number of valid tokens of each response, `[B]` int64.
pub fn valid_lengths(mask: &Tensor) -> Tensor {
    mask.to_kind(Kind::Int64)
        .sum_dim_intlist(1, false, Kind::Int64)
}

/// The last valid token of each response (position `L_i − 1`), `[B, T]` bool; an empty row has
/// none. This is where the outcome reward sits (spec §4.1).
pub fn last_token_mask(mask: &Tensor) -> Tensor {
    let valid = mask.to_kind(Kind::Int64);
    let count = valid.cumsum(1, Kind::Int64);
    count
        .eq_tensor(&valid_lengths(mask).unsqueeze(1))
        .logical_and(&valid.ne(0))
}

/// `mask` as 0/1 weights of the same kind and device as `values`.
pub(crate) fn weights(mask: &Tensor, values: &Tensor) -> Tensor {
    mask.to_kind(Kind::Bool).to_kind(values.kind())
}

/// Sum over each row's valid tokens, `[B]`.
pub fn masked_row_sum(values: &Tensor, mask: &Tensor) -> Tensor {
    (values * weights(mask, values)).sum_dim_intlist(1, false, values.kind())
}

/// Mean over each row's valid tokens, `[B]`; 0 for a row without valid tokens.
pub fn masked_row_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    let w = weights(mask, values);
    let count = w.sum_dim_intlist(1, false, values.kind()).clamp_min(1.0);
    (values * &w).sum_dim_intlist(1, false, values.kind()) / count
}

/// Mean over every valid token of the batch, a scalar.
pub fn masked_mean(values: &Tensor, mask: &Tensor) -> Tensor {
    let w = weights(mask, values);
    (values * &w).sum(values.kind()) / w.sum(values.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(rows: &[[i64; 5]]) -> Tensor {
        Tensor::from_slice2(rows)
    }

    fn bools(t: &Tensor) -> Vec<Vec<bool>> {
        Vec::<Vec<bool>>::try_from(t).unwrap()
    }

    #[test]
    fn mask_keeps_the_first_eos_and_drops_the_rest() {
        // eos ids 1 and 2; 0 is padding (generated = false there).
        let response = ids(&[
            [5, 1, 7, 1, 0],
            [5, 6, 7, 8, 9],
            [3, 4, 0, 0, 0],
            [2, 5, 0, 0, 0],
        ]);
        let generated = ids(&[
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
        ]);
        let mask = response_mask(&response, &generated.ne(0), &[1, 2]);
        assert_eq!(
            bools(&mask),
            vec![
                vec![true, true, false, false, false],
                vec![true; 5],
                vec![true, true, false, false, false],
                vec![true, false, false, false, false],
            ]
        );
        assert_eq!(
            Vec::<i64>::try_from(valid_lengths(&mask)).unwrap(),
            [2, 5, 2, 1]
        );
        assert_eq!(
            bools(&last_token_mask(&mask)),
            vec![
                vec![false, true, false, false, false],
                vec![false, false, false, false, true],
                vec![false, true, false, false, false],
                vec![true, false, false, false, false],
            ]
        );
    }

    #[test]
    fn padding_that_looks_like_eos_is_not_valid() {
        let response = ids(&[[5, 6, 1, 1, 1]]);
        let generated = ids(&[[1, 1, 0, 0, 0]]);
        let mask = response_mask(&response, &generated.ne(0), &[1]);
        assert_eq!(bools(&mask), vec![vec![true, true, false, false, false]]);
    }

    #[test]
    fn masked_means() {
        let values = Tensor::from_slice2(&[[1.0f32, 3.0, 100.0], [2.0, 100.0, 100.0]]);
        let mask = Tensor::from_slice2(&[[true, true, false], [true, false, false]]);
        let rows = Vec::<f32>::try_from(masked_row_mean(&values, &mask)).unwrap();
        assert_eq!(rows, [2.0, 2.0]);
        assert_eq!(masked_mean(&values, &mask).double_value(&[]), 2.0);
        assert_eq!(
            Vec::<f32>::try_from(masked_row_sum(&values, &mask)).unwrap(),
            [4.0, 2.0]
        );
    }
}
