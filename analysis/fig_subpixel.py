"""Shi et al. (2016), "Is the deconvolution layer the same as a convolutional layer?", computed.

Three figures, each with its data:

- ``subpixel_1d``: the note's Fig. 2 and 3a as matrices.  The stride-2 convolution of a length-8
  signal with f = (1, 2, 3, 4) (padding 2, output 5) and the cropped transposed convolution
  (length 5 -> 8), each built column by column from ``nsiter.conv2d`` / ``nsiter.conv_transpose2d``
  of unit vectors: one is the transpose of the other; and the two LR sub-filters of
  ``nsiter.subpixel_weight`` (Section 2: f = (1, 2, 3, 4) -> two filters of length 2).
- ``subpixel_equivalence``: the 2-D pictures (Figs. 4-7) on a real image: a stride-2 transposed
  convolution of the (gray) image with a (1, 1, 4, 4) kernel, the four (1, 2, 2) LR kernels, their
  four LR outputs, the periodic shuffle of those, and the difference of the two HR results.
- ``subpixel_cost``: Section 3's cost claim measured at r = 2, 3, 4 for one layer of 16 -> 16
  feature maps whose HR output is 240 x 240: (a) LR-space conv (16 -> 16 r², 3 x 3) + shuffle,
  (b) the equivalent transposed conv (kernel 3r, stride r), (c) bicubic upsampling
  (``scipy.ndimage.zoom``, order 3) followed by an HR conv with the same receptive field in
  input pixels (kernel 3r); time (median of repeats, nsiter on numpy) and multiply-add FLOPs.
  Plus the note's own pair: an LR layer of 32 maps, 3 x 3, on H/2 x W/2, against an HR layer
  of 8 maps, 6 x 6, on H x W: the same FLOPs.

Deterministic (fixed seeds); ``--image PATH`` replaces the bundled sample image.
"""
from __future__ import annotations

import time

import numpy as np

from _bench import median_time
from _figures import load_image, parser, plt, save_figure, write_csv, write_json

import nsiter

R_VALUES = (2, 3, 4)
HR = 240  # HR output size of the cost layers: divisible by 2, 3 and 4
CHANNELS = 16
K_LR = 3


def one_d_matrices():
    """Matrices of the stride-2 conv (Fig. 2) and the cropped transposed conv (Fig. 3a)."""
    f = np.array([1.0, 2.0, 3.0, 4.0])
    conv = np.stack([nsiter.conv2d(np.eye(8)[j][None, None, None], f[None, None, None], stride=(1, 2),
                                   padding=(0, 2))[0, 0, 0] for j in range(8)], axis=1)  # (5, 8)
    trans = np.stack([nsiter.conv_transpose2d(np.eye(5)[j][None, None, None], f[None, None, None],
                                              stride=(1, 2), padding=(0, 2))[0, 0, 0] for j in range(5)],
                     axis=1)  # (8, 5)
    # subpixel_weight takes one r for both axes: f goes into row 1 of a 2 x 4 kernel (row phase 1),
    # whose LR kernels 2 and 3 (phases (1, 0), (1, 1)) are the 1-D sub-filters
    f2 = np.zeros((1, 1, 2, 4))
    f2[0, 0, 1] = f
    w_lr = nsiter.subpixel_weight(f2, 2)[:, 0, 0]  # (4, 2)
    return f, conv, trans, w_lr[2:]  # (3, 1) and (4, 2): the note's f2 = (1, 3), f1 = (2, 4) reversed


def equivalence(img):
    """The 2-D transposed conv of ``img`` and its LR conv + shuffle (r = 2, 4 x 4 kernel, padding 1)."""
    x = img[None, None]
    t = np.array([0.25, 0.75, 0.75, 0.25])
    rng = np.random.default_rng(0)
    W = (np.outer(t, t) + 0.25 * rng.standard_normal((4, 4)))[None, None]  # bilinear + a random part
    hr = nsiter.conv_transpose2d(x, W, stride=2, padding=1)
    w_lr = nsiter.subpixel_weight(W, 2)  # (4, 1, 2, 2)
    lr = nsiter.conv2d(x, w_lr, padding=1)  # (1, 4, H + 1, W + 1): the note's "(4, 4, 4) output"
    shuffled = nsiter.pixel_shuffle(lr, 2)[:, :, 1:-1, 1:-1]  # crop p mod r = 1 on each side
    return W[0, 0], w_lr[:, 0], lr[0], hr[0, 0], shuffled[0, 0]


def cost_rows(rng, repeat):
    from scipy.ndimage import zoom

    rows = []
    for r in R_VALUES:
        lr_size = HR // r
        x = rng.standard_normal((1, CHANNELS, lr_size, lr_size))
        W = rng.standard_normal((CHANNELS, CHANNELS, K_LR * r, K_LR * r)) / (CHANNELS * K_LR * r)
        # padding of the transposed conv that keeps the HR size H r: p = r (k - 1) / 2 (k = 3: p = r)
        p = r * (K_LR - 1) // 2
        w_lr = nsiter.subpixel_weight(W, r)
        w_hr = rng.standard_normal((CHANNELS, CHANNELS, K_LR * r, K_LR * r)) / (CHANNELS * K_LR * r)

        def lr_route():
            return nsiter.pixel_shuffle(nsiter.conv2d(x, w_lr, padding=1), r)

        def transposed():
            return nsiter.conv_transpose2d(x, W, stride=r, padding=p, output_padding=0)

        def bicubic():  # plane by plane: a 4-D zoom would interpolate (order 3) along N and C too
            return np.stack([zoom(plane, r, order=3) for plane in x[0]])[None]

        up = bicubic()

        def hr_conv():
            return nsiter.conv2d(up, w_hr, padding="same")

        a = transposed()
        b = lr_route()
        assert a.shape == b.shape == (1, CHANNELS, HR, HR) == hr_conv().shape
        assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(a))  # same layer, two ways
        t = {name: median_time(f, repeat=repeat)
             for name, f in (("lr_conv_shuffle", lr_route), ("transposed", transposed), ("bicubic", bicubic),
                             ("hr_conv", hr_conv))}
        mac_lr = (lr_size + 2 - K_LR + 1) ** 2 * CHANNELS * CHANNELS * r * r * K_LR * K_LR
        mac_t = lr_size ** 2 * CHANNELS * CHANNELS * (K_LR * r) ** 2
        mac_hr = HR ** 2 * CHANNELS * CHANNELS * (K_LR * r) ** 2
        rows.append({"r": r, "lr_size": lr_size, "hr_size": HR, "channels": CHANNELS,
                     "lr_conv_shuffle_ms": 1e3 * t["lr_conv_shuffle"], "transposed_ms": 1e3 * t["transposed"],
                     "bicubic_ms": 1e3 * t["bicubic"], "hr_conv_ms": 1e3 * t["hr_conv"],
                     "bicubic_plus_hr_conv_ms": 1e3 * (t["bicubic"] + t["hr_conv"]),
                     "lr_conv_GFLOP": 2e-9 * mac_lr, "transposed_GFLOP": 2e-9 * mac_t,
                     "hr_conv_GFLOP": 2e-9 * mac_hr, "bicubic_GFLOP_approx": 2e-9 * 16 * HR * HR * CHANNELS})
        print(f"r = {r}: LR conv + shuffle {rows[-1]['lr_conv_shuffle_ms']:.1f} ms, transposed "
              f"{rows[-1]['transposed_ms']:.1f} ms, bicubic + HR conv {rows[-1]['bicubic_plus_hr_conv_ms']:.1f} ms",
              flush=True)
    return rows


def note_pair(rng, repeat):
    """Section 3: LR network layer (32 maps, 3 x 3, H/2) vs HR layer (8 maps, 6 x 6, H): equal FLOPs."""
    h = HR
    x_lr = rng.standard_normal((1, 32, h // 2, h // 2))
    w_lr = rng.standard_normal((32, 32, 3, 3))
    x_hr = rng.standard_normal((1, 8, h, h))
    w_hr = rng.standard_normal((8, 8, 6, 6))
    t_lr = median_time(lambda: nsiter.conv2d(x_lr, w_lr, padding="same"), repeat=repeat)
    t_hr = median_time(lambda: nsiter.conv2d(x_hr, w_hr, padding="same"), repeat=repeat)
    return {"lr_layer": "32 -> 32 maps, 3x3, on H/2 x W/2", "hr_layer": "8 -> 8 maps, 6x6, on H x W",
            "H": h, "lr_GFLOP": 2e-9 * 32 * 32 * 9 * (h // 2) ** 2, "hr_GFLOP": 2e-9 * 8 * 8 * 36 * h * h,
            "lr_ms": 1e3 * t_lr, "hr_ms": 1e3 * t_hr,
            "lr_parameters": 32 * 32 * 9, "hr_parameters": 8 * 8 * 36}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    # 1-D (Figs. 2, 3)
    f, conv, trans, subs = one_d_matrices()
    assert np.array_equal(conv.T, trans)
    fig, ax = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [8, 5, 2.5]})
    for a, m, title in ((ax[0], conv, "Fig. 2: stride-2 conv, 8 -> 5"),
                        (ax[1], trans, "Fig. 3a: transposed conv, 5 -> 8")):
        a.imshow(m, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            if v:
                a.text(j, i, f"{v:g}", ha="center", va="center", color="w", fontsize=8)
        a.set_title(title, fontsize=9)
        a.set_xticks([])
        a.set_yticks([])
    ax[2].imshow(subs, cmap="viridis")
    for (i, j), v in np.ndenumerate(subs):
        ax[2].text(j, i, f"{v:g}", ha="center", va="center", color="w", fontsize=9)
    ax[2].set_title("LR correlation filters\n(reversed f2, f1 of the note)", fontsize=9)
    ax[2].set_xticks([])
    ax[2].set_yticks([0, 1])
    fig.suptitle(f"f = {tuple(int(v) for v in f)}: the transposed conv matrix is the conv matrix transposed "
                 f"(exactly); it splits into two LR filters", fontsize=10)
    save_figure(fig, args.out, "subpixel_1d")

    # 2-D (Figs. 4-7) on the image
    img = load_image(args.image, gray=True)
    h0, w0 = img.shape[0] // 2 - 64, img.shape[1] // 2 - 64
    img = img[h0:h0 + 128, w0:w0 + 128]
    W, w_lr, lr, hr, shuffled = equivalence(img)
    diff = hr - shuffled
    rel = float(np.max(np.abs(diff)) / np.max(np.abs(hr)))
    fig, ax = plt.subplots(2, 6, figsize=(16, 5.8))
    ax[0, 0].imshow(img, cmap="gray")
    ax[0, 0].set_title(f"LR input {img.shape}", fontsize=9)
    ax[0, 1].imshow(W, cmap="RdBu_r")
    ax[0, 1].set_title("(1, 1, 4, 4) kernel", fontsize=9)
    for q in range(4):
        ax[0, 2 + q].imshow(w_lr[q], cmap="RdBu_r")
        ax[0, 2 + q].set_title(f"LR kernel {q} = (phase {q // 2}, {q % 2})", fontsize=9)
        ax[1, 2 + q].imshow(lr[q], cmap="gray")
        ax[1, 2 + q].set_title(f"LR output channel {q}", fontsize=9)
    ax[1, 0].imshow(hr, cmap="gray")
    ax[1, 0].set_title(f"transposed conv, stride 2 {hr.shape}", fontsize=9)
    ax[1, 1].imshow(shuffled, cmap="gray")
    ax[1, 1].set_title("LR conv + pixel shuffle", fontsize=9)
    for a in ax.ravel():
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"Section 2 on an image: max |transposed - shuffled| / max |transposed| = {rel:.1e}", fontsize=11)
    save_figure(fig, args.out, "subpixel_equivalence")
    fig, axd = plt.subplots(figsize=(4, 3.6))
    im = axd.imshow(diff, cmap="RdBu_r")
    fig.colorbar(im, ax=axd)
    axd.set_title("difference (rounding only)", fontsize=9)
    save_figure(fig, args.out, "subpixel_difference")

    # Section 3: cost
    rng = np.random.default_rng(1)
    rows = cost_rows(rng, args.repeat)
    pair = note_pair(rng, args.repeat)
    cols = list(rows[0])
    write_csv(args.out, "subpixel_cost", cols, [[row[c] for c in cols] for row in rows])
    fig, ax = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"wspace": 0.3})
    rs = [row["r"] for row in rows]
    for key, label in (("lr_conv_shuffle", "LR conv + shuffle"), ("transposed", "transposed conv"),
                       ("bicubic_plus_hr_conv", "bicubic + HR conv")):
        ax[0].plot(rs, [row[f"{key}_ms"] for row in rows], "o-", label=label)
    for key, label, style in (("lr_conv_GFLOP", "LR conv", "o-"), ("transposed_GFLOP", "transposed conv", "s--"),
                              ("hr_conv_GFLOP", "HR conv", "o-"), ("bicubic_GFLOP_approx", "bicubic (approx.)", "^:")):
        ax[1].plot(rs, [row[key] for row in rows], style, label=label)
    for a, yl in ((ax[0], "time [ms] (nsiter, numpy, median)"), (ax[1], "GFLOP (2 x multiply-adds)")):
        a.set_xlabel("upscaling factor r")
        a.set_ylabel(yl)
        a.set_yscale("log")
        a.set_xticks(rs)
        a.legend(fontsize=8)
    fig.suptitle(f"Section 3: a {CHANNELS} -> {CHANNELS} layer with {HR}x{HR} output; the note's pair: LR 32 maps "
                 f"3x3 {pair['lr_ms']:.1f} ms vs HR 8 maps 6x6 {pair['hr_ms']:.1f} ms "
                 f"({pair['lr_GFLOP']:.2f} GFLOP each)", fontsize=9)
    save_figure(fig, args.out, "subpixel_cost")
    write_json(args.out, "subpixel_data", {
        "equivalence": {"image_crop": list(img.shape), "kernel": W, "max_abs_diff": float(np.max(np.abs(diff))),
                        "max_rel_diff": rel},
        "one_d": {"f": f, "conv_matrix": conv, "transposed_matrix": trans, "lr_subfilters": subs},
        "cost": rows, "note_pair": pair, "repeat": args.repeat,
        "total_seconds": time.perf_counter() - t_start,
    })
    print(f"fig_subpixel: {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
