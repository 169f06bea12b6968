//! Evaluation of [`Expr`]: exactly over the rationals where possible, otherwise in complex
//! floating point with variables bound to a point.

use super::expr::{Expr, Func, NumValue};
use super::number::{Complex, Rational};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// Largest `n` for which `n!` is computed.
const MAX_FACTORIAL: i128 = 170;

/// The exact rational value, or `None` when the expression is irrational, has variables,
/// overflows `i128`, or is undefined.
pub fn exact(e: &Expr) -> Option<Rational> {
    match e {
        Expr::Num {
            value: NumValue::Exact(r),
            ..
        } => Some(*r),
        Expr::Num { .. } | Expr::Var(_) | Expr::Pi | Expr::E | Expr::I | Expr::Infinity => None,
        Expr::Neg(a) => exact(a)?.checked_neg(),
        Expr::Add(a, b) => exact(a)?.checked_add(exact(b)?),
        Expr::Sub(a, b) => exact(a)?.checked_sub(exact(b)?),
        Expr::Mul(a, b) => exact(a)?.checked_mul(exact(b)?),
        Expr::Div(a, b) => match (exact(a), exact(b)) {
            (Some(x), Some(y)) => x.checked_div(y),
            _ => factorial_quotient(a, b),
        },
        Expr::Pow(a, b) => {
            let base = exact(a)?;
            let exp = exact(b)?;
            if base.numer() == 0 && exp.numer() <= 0 {
                return None;
            }
            base.pow(exp)
        }
        Expr::Root(n, a) => exact(a)?.root(*n),
        Expr::Factorial(a) => {
            let n = exact(a)?;
            if !n.is_integer() || n.numer() < 0 || n.numer() > 33 {
                return None;
            }
            (1..=n.numer()).try_fold(Rational::integer(1), |acc, k| {
                acc.checked_mul(Rational::integer(k))
            })
        }
        Expr::Abs(a) => {
            let v = exact(a)?;
            if v.numer() < 0 {
                v.checked_neg()
            } else {
                Some(v)
            }
        }
        Expr::Binom(n, k) => {
            let n = exact(n)?;
            let k = exact(k)?;
            if !n.is_integer() || !k.is_integer() || n.numer() < 0 || k.numer() < 0 {
                return None;
            }
            let (n, k) = (n.numer(), k.numer());
            if k > n {
                return Some(Rational::integer(0));
            }
            let k = k.min(n - k);
            if k > 200 {
                return None;
            }
            (0..k).try_fold(Rational::integer(1), |acc, j| {
                acc.checked_mul(Rational::integer(n - j))?
                    .checked_div(Rational::integer(j + 1))
            })
        }
        Expr::LogBase(b, a) => {
            // Exact only for perfect powers: log_2 8 = 3, log_4 2 = 1/2.
            let b = exact(b)?;
            let a = exact(a)?;
            let lf = a.to_f64().ln() / b.to_f64().ln();
            if !lf.is_finite() {
                return None;
            }
            let candidate = Rational::new((lf * 64.0).round() as i128, 64)?;
            (b.pow(candidate)? == a).then_some(candidate)
        }
        Expr::Call(_, _) => None,
    }
}

/// Largest gap `n - m` for which `n!/m!` is multiplied out.
const MAX_FACTORIAL_GAP: i128 = 200;

/// `175! \cdot 56! / (55! \cdot 176!)`: factorials too large for `i128` (or `f64`) that cancel
/// in a quotient. Numerator and denominator factorials are paired largest with largest and each
/// pair `n!/m!` multiplied out as `(m+1)\cdots n`; anything else must be exact.
fn factorial_quotient(num: &Expr, den: &Expr) -> Option<Rational> {
    fn factors<'a>(e: &'a Expr, facts: &mut Vec<i128>, rest: &mut Vec<&'a Expr>) {
        match e {
            Expr::Mul(a, b) => {
                factors(a, facts, rest);
                factors(b, facts, rest);
            }
            Expr::Factorial(a) => match exact(a) {
                Some(n) if n.is_integer() && n.numer() >= 0 => facts.push(n.numer()),
                _ => rest.push(e),
            },
            _ => rest.push(e),
        }
    }
    let (mut top, mut top_rest, mut bottom, mut bottom_rest) = (vec![], vec![], vec![], vec![]);
    factors(num, &mut top, &mut top_rest);
    factors(den, &mut bottom, &mut bottom_rest);
    if top.is_empty() || bottom.is_empty() {
        return None;
    }
    top.sort_unstable_by(|a, b| b.cmp(a));
    bottom.sort_unstable_by(|a, b| b.cmp(a));
    let mut value = Rational::integer(1);
    for (&n, &m) in top.iter().zip(&bottom) {
        if (n - m).abs() > MAX_FACTORIAL_GAP {
            return None;
        }
        let product = (n.min(m) + 1..=n.max(m)).try_fold(Rational::integer(1), |acc, k| {
            acc.checked_mul(Rational::integer(k))
        })?;
        value = if n >= m {
            value.checked_mul(product)?
        } else {
            value.checked_div(product)?
        };
    }
    let single = |n: &i128| {
        (1..=*n).try_fold(Rational::integer(1), |acc, k| {
            acc.checked_mul(Rational::integer(k))
        })
    };
    for n in top.iter().skip(bottom.len()) {
        value = value.checked_mul(single(n)?)?;
    }
    for n in bottom.iter().skip(top.len()) {
        value = value.checked_div(single(n)?)?;
    }
    for e in top_rest {
        value = value.checked_mul(exact(e)?)?;
    }
    for e in bottom_rest {
        value = value.checked_div(exact(e)?)?;
    }
    Some(value)
}

/// Why a float evaluation produced nothing comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalError;

/// Evaluates at `point` (values for the variables, by name). Infinity is only allowed as a bare
/// value (`\infty`, `-\infty`); any overflow or undefined operation is an error, so two huge or
/// undefined values never compare equal by accident.
pub fn eval(e: &Expr, point: &[(String, Complex)]) -> Result<Complex, EvalError> {
    match e {
        Expr::Infinity => return Ok(Complex::real(f64::INFINITY)),
        Expr::Neg(a) if **a == Expr::Infinity => return Ok(Complex::real(f64::NEG_INFINITY)),
        _ => {}
    }
    let v = eval_finite(e, point)?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(EvalError)
    }
}

fn eval_finite(e: &Expr, point: &[(String, Complex)]) -> Result<Complex, EvalError> {
    let r = |x: &Expr| eval_finite(x, point);
    let v = match e {
        Expr::Num { value, .. } => match value {
            NumValue::Exact(q) => Complex::real(q.to_f64()),
            NumValue::Approx(f) => Complex::real(*f),
        },
        Expr::Var(name) => point
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
            .ok_or(EvalError)?,
        Expr::Pi => Complex::real(std::f64::consts::PI),
        Expr::E => Complex::real(std::f64::consts::E),
        Expr::I => Complex::new(0.0, 1.0),
        Expr::Infinity => return Err(EvalError),
        Expr::Neg(a) => r(a)?.neg(),
        Expr::Add(a, b) => r(a)?.add(r(b)?),
        Expr::Sub(a, b) => r(a)?.sub(r(b)?),
        Expr::Mul(a, b) => r(a)?.mul(r(b)?),
        Expr::Div(a, b) => {
            let d = r(b)?;
            if d.abs() == 0.0 {
                return Err(EvalError);
            }
            r(a)?.div(d)
        }
        Expr::Pow(a, b) => {
            let base = r(a)?;
            let exp = r(b)?;
            if exp.abs() > 1e4 {
                return Err(EvalError);
            }
            match exact(b) {
                // `(x^2 - 2)^{5/3}` with a negative base: the real odd root a reader means, as
                // for `\sqrt[3]{x^2 - 2}^5`.
                Some(q)
                    if base.is_real() && base.re < 0.0 && !q.is_integer() && q.denom() % 2 == 1 =>
                {
                    let magnitude = (-base.re).powf(q.to_f64());
                    let sign = if q.numer() % 2 == 0 { 1.0 } else { -1.0 };
                    Complex::real(sign * magnitude)
                }
                _ => base.pow(exp),
            }
        }
        Expr::Root(n, a) => {
            let x = r(a)?;
            if x.is_real() && x.re < 0.0 && n % 2 == 1 {
                Complex::real(-(-x.re).powf(1.0 / *n as f64))
            } else if *n == 2 {
                x.sqrt()
            } else {
                x.pow(Complex::real(1.0 / *n as f64))
            }
        }
        Expr::Factorial(a) => factorial(r(a)?)?,
        Expr::Abs(a) => Complex::real(r(a)?.abs()),
        Expr::Binom(n, k) => {
            let n = r(n)?;
            let k = r(k)?;
            if !n.is_real() || !k.is_real() || k.re.fract() != 0.0 || !(0.0..=1e4).contains(&k.re) {
                return Err(EvalError);
            }
            let mut acc = 1.0;
            for j in 0..k.re as u32 {
                acc *= (n.re - f64::from(j)) / f64::from(j + 1);
            }
            Complex::real(acc)
        }
        Expr::LogBase(b, a) => {
            let lb = r(b)?.ln();
            if lb.abs() == 0.0 {
                return Err(EvalError);
            }
            r(a)?.ln().div(lb)
        }
        Expr::Call(f, a) => call(*f, r(a)?)?,
    };
    if v.is_finite() {
        Ok(v)
    } else {
        Err(EvalError)
    }
}

fn call(f: Func, x: Complex) -> Result<Complex, EvalError> {
    let one = Complex::real(1.0);
    let half_pi = Complex::real(std::f64::consts::FRAC_PI_2);
    let recip = |d: Complex| {
        if d.abs() < 1e-300 {
            Err(EvalError)
        } else {
            Ok(one.div(d))
        }
    };
    Ok(match f {
        Func::Sin => x.sin(),
        Func::Cos => x.cos(),
        Func::Tan => x.sin().mul(recip(x.cos())?),
        Func::Sec => recip(x.cos())?,
        Func::Csc => recip(x.sin())?,
        Func::Cot => x.cos().mul(recip(x.sin())?),
        Func::Arcsin => x.asin(),
        Func::Arccos => half_pi.sub(x.asin()),
        Func::Arctan => x.atan(),
        Func::Sinh => x.exp().sub(x.neg().exp()).mul(Complex::real(0.5)),
        Func::Cosh => x.exp().add(x.neg().exp()).mul(Complex::real(0.5)),
        Func::Tanh => {
            let a = x.exp();
            let b = x.neg().exp();
            a.sub(b).mul(recip(a.add(b))?)
        }
        Func::Csch => recip(call(Func::Sinh, x)?)?,
        Func::Sech => recip(call(Func::Cosh, x)?)?,
        Func::Coth => recip(call(Func::Tanh, x)?)?,
        Func::Arccsc => recip(x)?.asin(),
        Func::Arcsec => half_pi.sub(recip(x)?.asin()),
        Func::Arccot => recip(x)?.atan(),
        Func::Abs => Complex::real(x.abs()),
        Func::Floor | Func::Ceil if x.is_real() => Complex::real(if f == Func::Floor {
            x.re.floor()
        } else {
            x.re.ceil()
        }),
        Func::Floor | Func::Ceil => return Err(EvalError),
        Func::Factorial => factorial(x)?,
        Func::Lg => {
            if x.abs() == 0.0 {
                return Err(EvalError);
            }
            x.ln().mul(Complex::real(1.0 / std::f64::consts::LN_10))
        }
        Func::Ln | Func::Log => {
            if x.abs() == 0.0 {
                return Err(EvalError);
            }
            x.ln()
        }
        Func::Exp => x.exp(),
    })
}

/// `x!`: the product for a whole number, Gamma(x + 1) at a sampled non-integer `x` (so that
/// `(n+1) n!` and `(n+1)!` compare as the identities they are).
fn factorial(x: Complex) -> Result<Complex, EvalError> {
    let pole = x.re < 0.0 && x.re.fract() == 0.0;
    if !x.is_real() || pole || x.re > MAX_FACTORIAL as f64 {
        return Err(EvalError);
    }
    Ok(if x.re >= 0.0 && x.re.fract() == 0.0 {
        Complex::real((1..=x.re as u32).map(f64::from).product())
    } else {
        Complex::real(gamma(x.re + 1.0))
    })
}

/// The Gamma function for `x > 0` (Lanczos approximation, g = 7, about 15 significant digits).
fn gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let t = x + G + 0.5;
    let sum = C[1..]
        .iter()
        .enumerate()
        .fold(C[0], |acc, (i, c)| acc + c / (x + i as f64 + 1.0));
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * sum
}
