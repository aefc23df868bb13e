"""The pre-D closed-form conversions of a network output of ``kind`` (eps, x0 or v) at x_t (VP coordinates)
and alpha-bar, written out independently of the library (Ho et al. 2020, Eq. 4; Salimans & Ho 2022, Sec. 4):
the reference the guidance tests compare the denoiser's wrappers against."""


def old_x0(kind, xt, abar, out):
    if kind == "eps":
        return (xt - (1 - abar).sqrt() * out) / abar.sqrt()
    if kind == "x0":
        return out
    return abar.sqrt() * xt - (1 - abar).sqrt() * out                    # v


def old_eps(kind, xt, abar, out):
    if kind == "eps":
        return out
    if kind == "x0":
        return (xt - abar.sqrt() * out) / (1 - abar).sqrt()
    return (1 - abar).sqrt() * xt + abar.sqrt() * out                    # v
