//! The two number domains the math grader evaluates in: exact rationals (checked `i128`, so an
//! overflow means "not exactly representable" rather than a wrong answer) and complex `f64` for
//! everything else (radicals, pi, logarithms, variables at random points).

use std::cmp::Ordering;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// An exact rational number in lowest terms with a positive denominator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    num: i128,
    den: i128,
}

fn gcd(mut a: i128, mut b: i128) -> i128 {
    a = a.abs();
    b = b.abs();
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

impl Rational {
    /// The rational `num / den`, or `None` when `den` is zero or reducing overflows.
    pub fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 || num == i128::MIN || den == i128::MIN {
            return None;
        }
        let g = gcd(num, den).max(1);
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = -num;
            den = -den;
        }
        Some(Self { num, den })
    }

    /// The integer `n` as a rational.
    pub fn integer(n: i128) -> Self {
        Self { num: n, den: 1 }
    }

    /// Numerator (sign carrier).
    pub fn numer(&self) -> i128 {
        self.num
    }

    /// Denominator (always positive).
    pub fn denom(&self) -> i128 {
        self.den
    }

    /// Whether the value is an integer.
    pub fn is_integer(&self) -> bool {
        self.den == 1
    }

    /// Nearest `f64`.
    pub fn to_f64(&self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// Checked sum.
    pub fn checked_add(self, o: Self) -> Option<Self> {
        let g = gcd(self.den, o.den).max(1);
        let den = (self.den / g).checked_mul(o.den)?;
        let num = self
            .num
            .checked_mul(o.den / g)?
            .checked_add(o.num.checked_mul(self.den / g)?)?;
        Self::new(num, den)
    }

    /// Checked negation.
    pub fn checked_neg(self) -> Option<Self> {
        Some(Self {
            num: self.num.checked_neg()?,
            den: self.den,
        })
    }

    /// Checked difference.
    pub fn checked_sub(self, o: Self) -> Option<Self> {
        self.checked_add(o.checked_neg()?)
    }

    /// Checked product.
    pub fn checked_mul(self, o: Self) -> Option<Self> {
        let g1 = gcd(self.num, o.den).max(1);
        let g2 = gcd(o.num, self.den).max(1);
        let num = (self.num / g1).checked_mul(o.num / g2)?;
        let den = (self.den / g2).checked_mul(o.den / g1)?;
        Self::new(num, den)
    }

    /// Checked quotient; `None` on division by zero.
    pub fn checked_div(self, o: Self) -> Option<Self> {
        if o.num == 0 {
            return None;
        }
        self.checked_mul(Self::new(o.den, o.num)?)
    }

    /// Integer power with a bounded exponent.
    pub fn powi(self, exp: i128) -> Option<Self> {
        if exp.unsigned_abs() > 4096 {
            return None;
        }
        let base = if exp < 0 {
            Self::integer(1).checked_div(self)?
        } else {
            self
        };
        let mut e = exp.unsigned_abs();
        let mut acc = Self::integer(1);
        let mut sq = base;
        while e > 0 {
            if e & 1 == 1 {
                acc = acc.checked_mul(sq)?;
            }
            e >>= 1;
            if e > 0 {
                sq = sq.checked_mul(sq)?;
            }
        }
        Some(acc)
    }

    /// The exact `n`-th root when it is rational (`None` otherwise). Odd roots of negative
    /// numbers are real and negative, as a reader of `\sqrt[3]{-8}` expects.
    pub fn root(self, n: u32) -> Option<Self> {
        if n == 0 {
            return None;
        }
        if self.num < 0 {
            if n.is_multiple_of(2) {
                return None;
            }
            return self.checked_neg()?.root(n)?.checked_neg();
        }
        Self::new(int_root(self.num, n)?, int_root(self.den, n)?)
    }

    /// Rational power `self^(p/q)` when the result is rational.
    pub fn pow(self, exp: Self) -> Option<Self> {
        if exp.is_integer() {
            return self.powi(exp.num);
        }
        let q = u32::try_from(exp.den).ok().filter(|&q| q <= 64)?;
        self.root(q)?.powi(exp.num)
    }
}

impl PartialOrd for Rational {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Rational {
    fn cmp(&self, other: &Self) -> Ordering {
        match (
            self.num.checked_mul(other.den),
            other.num.checked_mul(self.den),
        ) {
            (Some(a), Some(b)) => a.cmp(&b),
            _ => self
                .to_f64()
                .partial_cmp(&other.to_f64())
                .unwrap_or(Ordering::Equal),
        }
    }
}

/// Exact integer `n`-th root of a non-negative integer, if there is one.
fn int_root(x: i128, n: u32) -> Option<i128> {
    if x < 0 {
        return None;
    }
    if x < 2 || n == 1 {
        return Some(x);
    }
    let guess = (x as f64).powf(1.0 / n as f64).round() as i128;
    (guess.saturating_sub(1)..=guess.saturating_add(1))
        .filter(|c| *c >= 0)
        .find(|c| c.checked_pow(n) == Some(x))
}

/// A complex number in `f64`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Complex {
    /// Real part.
    pub re: f64,
    /// Imaginary part.
    pub im: f64,
}

impl Complex {
    /// `re + i im`.
    pub const fn new(re: f64, im: f64) -> Self {
        Self { re, im }
    }

    /// A real number.
    pub const fn real(re: f64) -> Self {
        Self { re, im: 0.0 }
    }

    /// Modulus.
    pub fn abs(self) -> f64 {
        self.re.hypot(self.im)
    }

    /// Whether both parts are finite.
    pub fn is_finite(self) -> bool {
        self.re.is_finite() && self.im.is_finite()
    }

    /// Whether the imaginary part is zero.
    pub fn is_real(self) -> bool {
        self.im == 0.0
    }

    /// `e^z`.
    pub fn exp(self) -> Self {
        let m = self.re.exp();
        if self.im == 0.0 {
            return Self::real(m);
        }
        Self::new(m * self.im.cos(), m * self.im.sin())
    }

    /// Principal natural logarithm.
    pub fn ln(self) -> Self {
        if self.im == 0.0 && self.re > 0.0 {
            return Self::real(self.re.ln());
        }
        Self::new(self.abs().ln(), self.im.atan2(self.re))
    }

    /// Principal square root.
    pub fn sqrt(self) -> Self {
        if self.im == 0.0 {
            return if self.re >= 0.0 {
                Self::real(self.re.sqrt())
            } else {
                Self::new(0.0, (-self.re).sqrt())
            };
        }
        let r = self.abs();
        let re = ((r + self.re) / 2.0).sqrt();
        let im = ((r - self.re) / 2.0).sqrt().copysign(self.im);
        Self::new(re, im)
    }

    /// Principal power `self^o`, exact-ish for real bases with integer exponents.
    pub fn pow(self, o: Self) -> Self {
        if o.im == 0.0 && self.im == 0.0 {
            if o.re.fract() == 0.0 && o.re.abs() < 1e9 {
                return Self::real(self.re.powi(o.re as i32));
            }
            if self.re >= 0.0 {
                return Self::real(self.re.powf(o.re));
            }
        }
        if self.re == 0.0 && self.im == 0.0 {
            return if o.re > 0.0 {
                Self::real(0.0)
            } else {
                Self::real(f64::NAN)
            };
        }
        o.mul(self.ln()).exp()
    }

    /// Sine.
    pub fn sin(self) -> Self {
        Self::new(
            self.re.sin() * self.im.cosh(),
            self.re.cos() * self.im.sinh(),
        )
    }

    /// Cosine.
    pub fn cos(self) -> Self {
        Self::new(
            self.re.cos() * self.im.cosh(),
            -self.re.sin() * self.im.sinh(),
        )
    }

    /// Principal arcsine: `-i ln(iz + sqrt(1 - z^2))`.
    pub fn asin(self) -> Self {
        if self.im == 0.0 && self.re.abs() <= 1.0 {
            return Self::real(self.re.asin());
        }
        let i = Self::new(0.0, 1.0);
        let one = Self::real(1.0);
        i.mul(self)
            .add(one.sub(self.mul(self)).sqrt())
            .ln()
            .mul(i.neg())
    }

    /// Principal arctangent: `(i/2) ln((i + z)/(i - z))`.
    pub fn atan(self) -> Self {
        if self.im == 0.0 {
            return Self::real(self.re.atan());
        }
        let i = Self::new(0.0, 1.0);
        Self::new(0.0, 0.5).mul(i.add(self).div(i.sub(self)).ln())
    }
}

impl std::ops::Add for Complex {
    type Output = Self;

    fn add(self, o: Self) -> Self {
        Self::new(self.re + o.re, self.im + o.im)
    }
}

impl std::ops::Sub for Complex {
    type Output = Self;

    fn sub(self, o: Self) -> Self {
        Self::new(self.re - o.re, self.im - o.im)
    }
}

impl std::ops::Mul for Complex {
    type Output = Self;

    fn mul(self, o: Self) -> Self {
        Self::new(
            self.re * o.re - self.im * o.im,
            self.re * o.im + self.im * o.re,
        )
    }
}

impl std::ops::Div for Complex {
    type Output = Self;

    fn div(self, o: Self) -> Self {
        if o.im == 0.0 {
            return Self::new(self.re / o.re, self.im / o.re);
        }
        let d = o.re * o.re + o.im * o.im;
        Self::new(
            (self.re * o.re + self.im * o.im) / d,
            (self.im * o.re - self.re * o.im) / d,
        )
    }
}

impl std::ops::Neg for Complex {
    type Output = Self;

    fn neg(self) -> Self {
        Self::new(-self.re, -self.im)
    }
}

/// Whether `a` and `b` agree within relative tolerance `rel` (with an absolute floor so that
/// values that should be zero compare equal to float noise).
pub fn close(a: Complex, b: Complex, rel: f64) -> bool {
    let diff = a.sub(b).abs();
    let scale = a.abs().max(b.abs());
    diff <= rel * scale || diff <= 1e-12
}
