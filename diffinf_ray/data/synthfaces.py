"""synthfaces: a procedural face generator with known truth (DESIGN.md, "Data for development").

Every sample is a pure function of (spec, index): the sample's person is drawn from
`num_identities` identities keyed by (seed, index); the person's identity factors (face shape,
skin tone, hair, eyes, nose, brows, mouth) come from an RNG keyed by (seed, identity), so the
same person drawn at two ages or with two expressions keeps them. Per sample, an RNG keyed by
(seed, index) draws the attributes to learn (age 0-80, expression and its intensity) and the
confounders (pose, lighting, background, clothing, sensor noise).

Rendering draws polygons with Pillow at 4x the output resolution and downsamples with LANCZOS
(anti-aliasing); the optional region mask (manifest.REGIONS ids) is drawn with the same
geometry and downsampled nearest-neighbour. Lighting is a shading gradient applied to the
person at output resolution, then the person is composited over the background.

Age is visible through head proportions (children: round face, big eyes low in the face, small
nose and jaw, rosy cheeks), wrinkles (forehead, crow's feet, nasolabial and marionette lines,
eye bags, age spots), greying from the mid-40s and a receding, thinning hairline in old age.
Expressions (0 happy, 1 neutral, 2 surprised, 3 sad) move the mouth curve and opening, brows
and eye opening by a continuous intensity; every person also has a resting mouth curve and
per-sample micro-variation, so intensities below ~0.25 are genuinely ambiguous with neutral.

Biased draws (`severity` set; issue "fairness", METHOD.md "A second seed"): the skin tone,
binned into `spurious_levels` values (SPURIOUS_VALUES), is made a spurious attribute. Each sample
draws its split from (seed, index), its class as usual, a spurious value, and then its person
uniformly among the people of that split and that value (splits stay identity-disjoint). In the
training split class k takes its majority value k mod levels with probability `severity` and
each other value with (1 - severity) / (levels - 1); val and test draw the value uniformly and
independently of the class, so their (class, value) cells are balanced in expectation.
`severity` = 1 / levels is no correlation (0.5 for two values). The `group` column then holds
the cell, "<class name>|<value>", and `spurious` the value alone.

Compute core: no Ray import. The manifest columns are built by `generate_batch`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffinf_ray.data.images import encode_png
from diffinf_ray.manifest import REGIONS

AGE_CLASSES = ("young", "middle", "old")
EXPRESSION_CLASSES = ("happy", "neutral", "surprised", "sad")
TASKS = ("age", "expression")
HAPPY, NEUTRAL, SURPRISED, SAD = range(4)
AGE_RANGE = (0.0, 80.0)  # ages drawn for the expression task; age bins must lie in [0, 100]
MIN_RESOLUTION, MAX_RESOLUTION = 32, 128
SUPERSAMPLE = 4
HAIR_STYLES = ("short", "long", "bob", "curly", "cropped")
SKIN_GROUPS = ("tone_light", "tone_medium", "tone_dark")
# the spurious attribute's values per number of levels (skin tone binned evenly)
SPURIOUS_VALUES = {2: ("tone_light", "tone_dark"), 3: SKIN_GROUPS}
WEAK_FRACTION = 0.15  # expression task: share of samples with a weak (ambiguous) intensity
WEAK_INTENSITY = (0.05, 0.25)
CLEAR_INTENSITY = (0.45, 1.0)
# default expression gain per task: 1 keeps the age task's faces as they always were; at 1 an
# expression is a 2-3 pixel change of a 32 px face and a clean-label classifier is near chance
# (benchmarks/RESULTS.md, "Is synthfaces expression learnable?")
EXPRESSION_GAIN = {"age": 1.0, "expression": 4.0}
MAX_EXPRESSION_GAIN = 4.0

# RNG stream tags: every stream is keyed by (seed, key, tag) so streams never collide.
_TAG_PICK, _TAG_IDENTITY, _TAG_SPLIT, _TAG_SAMPLE, _TAG_BIAS = 11, 12, 13, 14, 15

_SKIN_ANCHORS = np.array(
    [
        (250, 218, 196),
        (236, 192, 158),
        (205, 152, 112),
        (160, 108, 74),
        (104, 68, 48),
        (70, 46, 34),
    ],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [
        (22, 19, 18),  # black
        (55, 36, 26),  # dark brown
        (102, 68, 42),  # brown
        (150, 108, 66),  # light brown
        (212, 176, 112),  # blonde
        (150, 62, 30),  # auburn
        (196, 106, 50),  # ginger
    ],
    dtype=np.float64,
)
# hair colour probabilities per skin-tone group (light, medium, dark)
_HAIR_PROBS = np.array(
    [
        (0.12, 0.20, 0.22, 0.16, 0.18, 0.06, 0.06),
        (0.35, 0.35, 0.18, 0.08, 0.02, 0.02, 0.00),
        (0.70, 0.26, 0.04, 0.00, 0.00, 0.00, 0.00),
    ]
)
_EYE_COLOURS = np.array(
    [
        (48, 30, 20),  # dark brown
        (92, 56, 30),  # brown
        (112, 94, 50),  # hazel
        (70, 112, 72),  # green
        (62, 104, 168),  # blue
        (112, 124, 136),  # grey
    ],
    dtype=np.float64,
)
_EYE_PROBS = np.array(
    [
        (0.15, 0.20, 0.15, 0.15, 0.25, 0.10),
        (0.45, 0.35, 0.15, 0.03, 0.02, 0.00),
        (0.75, 0.25, 0.00, 0.00, 0.00, 0.00),
    ]
)
_GREY_HAIR = np.array((206, 204, 200), dtype=np.float64)
_WHITE_HAIR = np.array((236, 234, 230), dtype=np.float64)


# --------------------------------------------------------------------------------------------
# spec


@dataclass(frozen=True)
class SynthFacesSpec:
    """What data set to generate. Splits are assigned by identity: no person is in two splits."""

    task: str = "age"
    resolution: int = 64
    seed: int = 0
    num_identities: int = 500
    age_bins: tuple[tuple[float, float], ...] = ((0.0, 18.0), (25.0, 40.0), (50.0, 80.0))
    with_masks: bool = True
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train / val / test
    # biased draw (module docstring): None = the plain draw; else the share of each training
    # class in its majority spurious value
    severity: float | None = None
    spurious_levels: int = 2
    # stretch of clear expressions beyond the weak band (`shown_intensity`); None: the task's
    # default (EXPRESSION_GAIN), so age faces stay as they were and expressions read at 32 px
    expression_gain: float | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"SynthFacesSpec.task: {self.task!r} is not one of {TASKS}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int | np.integer):
            raise ValueError(f"SynthFacesSpec.resolution: {self.resolution!r} is not an integer")
        if not MIN_RESOLUTION <= self.resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"SynthFacesSpec.resolution: {self.resolution} is outside "
                f"[{MIN_RESOLUTION}, {MAX_RESOLUTION}]"
            )
        if not isinstance(self.seed, int | np.integer) or self.seed < 0:
            raise ValueError(f"SynthFacesSpec.seed: {self.seed!r} is not an integer >= 0")
        if not isinstance(self.num_identities, int | np.integer) or self.num_identities < 1:
            raise ValueError(
                f"SynthFacesSpec.num_identities: {self.num_identities!r} is not an integer >= 1"
            )
        try:
            bins = tuple((float(lo), float(hi)) for lo, hi in self.age_bins)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"SynthFacesSpec.age_bins: {self.age_bins!r} is not a sequence of (low, high) pairs"
            ) from exc
        if not bins:
            raise ValueError("SynthFacesSpec.age_bins: needs at least one bin")
        for lo, hi in bins:
            if not (0.0 <= lo < hi <= 100.0):
                raise ValueError(
                    f"SynthFacesSpec.age_bins: bin ({lo:g}, {hi:g}) needs 0 <= low < high <= 100"
                )
        for (_, hi), (lo, _) in zip(bins[:-1], bins[1:], strict=True):
            if lo < hi:
                raise ValueError(
                    f"SynthFacesSpec.age_bins: bins {bins} are not sorted and non-overlapping"
                )
        object.__setattr__(self, "age_bins", bins)
        try:
            fractions = tuple(float(f) for f in self.split_fractions)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"SynthFacesSpec.split_fractions: {self.split_fractions!r} is not three numbers"
            ) from exc
        if len(fractions) != 3 or any(f < 0 for f in fractions):
            raise ValueError(
                f"SynthFacesSpec.split_fractions: {fractions} needs three non-negative "
                "fractions (train, val, test)"
            )
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(
                f"SynthFacesSpec.split_fractions: {fractions} sums to {sum(fractions):g}, not 1"
            )
        object.__setattr__(self, "split_fractions", fractions)
        if self.spurious_levels not in SPURIOUS_VALUES:
            raise ValueError(f"SynthFacesSpec.spurious_levels: {self.spurious_levels!r} is not "
                             f"one of {sorted(SPURIOUS_VALUES)}")
        if self.severity is not None:
            if isinstance(self.severity, bool) or not 0.0 <= float(self.severity) <= 1.0:
                raise ValueError(f"SynthFacesSpec.severity: {self.severity!r} is not in [0, 1]")
            object.__setattr__(self, "severity", float(self.severity))
        object.__setattr__(self, "resolution", int(self.resolution))
        object.__setattr__(self, "seed", int(self.seed))
        gain = resolved_expression_gain(self.task, self.expression_gain)
        if isinstance(gain, bool) or not isinstance(gain, int | float | np.number) \
                or not 0.0 <= float(gain) <= MAX_EXPRESSION_GAIN:
            raise ValueError(f"SynthFacesSpec.expression_gain: {self.expression_gain!r} is not a "
                             f"number in [0, {MAX_EXPRESSION_GAIN:g}]")
        object.__setattr__(self, "expression_gain", float(gain))
        object.__setattr__(self, "num_identities", int(self.num_identities))


def resolved_expression_gain(task: str, gain: float | None):
    """The gain faces are drawn with: `gain`, or the task's default (EXPRESSION_GAIN) when None;
    1 for a task without one."""
    return EXPRESSION_GAIN.get(task, 1.0) if gain is None else gain


def class_names(spec: SynthFacesSpec) -> tuple[str, ...]:
    """Class names in label order (age: one per bin, AGE_CLASSES when there are three)."""
    if spec.task == "expression":
        return EXPRESSION_CLASSES
    if len(spec.age_bins) == len(AGE_CLASSES):
        return AGE_CLASSES
    return tuple(f"age_{lo:g}-{hi:g}" for lo, hi in spec.age_bins)


# --------------------------------------------------------------------------------------------
# factors


@dataclass(frozen=True)
class IdentityFactors:
    """What makes a person: fixed across all of their samples."""

    index: int
    skin_tone: float  # 0 light .. 1 dark
    skin_rgb: tuple[float, float, float]
    face_width: float  # adult half-width of the face (unit: half the head height)
    face_length: float  # adult chin distance below the head centre
    jaw_taper: float  # 0 broad jaw .. 1 narrow, pointed chin
    jaw_square: float  # exponent of the jaw curve: < 1 squarer, 1 rounder
    hair_rgb: tuple[float, float, float]
    hair_style: str
    hair_volume: float
    grey_onset: float  # age at which greying starts
    balding: float  # 0..1 propensity for a receding, thinning hairline in old age
    eye_spacing: float
    eye_size: float
    eye_rgb: tuple[float, float, float]
    nose_width: float
    nose_length: float
    brow_thickness: float
    brow_arch: float
    brow_height: float
    mouth_width: float
    lip_fullness: float
    lip_rgb: tuple[float, float, float]
    rest_curve: float  # resting mouth curvature (+ up), makes weak expressions ambiguous
    ear_size: float
    wrinkle_seed: int  # per-person wrinkle pattern

    @property
    def identity(self) -> str:
        return f"p{self.index:06d}"

    @property
    def group(self) -> str:
        return SKIN_GROUPS[min(int(self.skin_tone * 3.0), 2)]


@dataclass(frozen=True)
class FaceFactors:
    """Everything `render` needs: the person, the attributes to learn and the confounders."""

    identity: IdentityFactors
    age: float  # years, 0-80 (up to 100 with custom bins)
    expression: int  # index into EXPRESSION_CLASSES
    intensity: float  # 0..1; 0 for neutral
    shift: tuple[float, float]  # head centre offset, fraction of the image
    scale: float
    roll: float  # radians, in-plane rotation
    yaw: float  # radians, head turn (squash + feature offset)
    gaze: tuple[float, float]
    light_angle: float  # radians, direction the light comes from
    light_strength: float  # 0..~0.4 amplitude of the shading gradient
    exposure: float
    background_kind: int  # 0 flat, 1 linear gradient, 2 radial gradient
    background_rgb: tuple[tuple[float, float, float], tuple[float, float, float]]
    background_angle: float
    clothing_rgb: tuple[float, float, float]
    micro: tuple[float, float, float]  # mouth curve, brow height, eye opening jitter
    noise_sigma: float
    noise_seed: int
    # how far clear expressions go beyond the ambiguous band (shown_intensity); 1 = as drawn
    expression_gain: float = 1.0

    @property
    def expression_name(self) -> str:
        return EXPRESSION_CLASSES[self.expression]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _tup(a: np.ndarray) -> tuple[float, float, float]:
    return (float(a[0]), float(a[1]), float(a[2]))


@lru_cache(maxsize=8192)
def identity_factors(seed: int, identity: int) -> IdentityFactors:
    """The identity factors of person `identity` (0..num_identities-1) under `seed`."""
    r = _rng(seed, identity, _TAG_IDENTITY)
    tone = float(r.random())
    pos = tone * (len(_SKIN_ANCHORS) - 1)
    i0 = min(int(pos), len(_SKIN_ANCHORS) - 2)
    skin = _SKIN_ANCHORS[i0] + (pos - i0) * (_SKIN_ANCHORS[i0 + 1] - _SKIN_ANCHORS[i0])
    skin = np.clip(skin + r.normal(0.0, 5.0, 3) + np.array((3.0, 0.0, -3.0)) * r.normal(), 0, 255)
    group = min(int(tone * 3.0), 2)
    hair = _HAIR_COLOURS[r.choice(len(_HAIR_COLOURS), p=_HAIR_PROBS[group])]
    hair = np.clip(hair * r.uniform(0.88, 1.12) + r.normal(0.0, 4.0, 3), 0, 255)
    eye = _EYE_COLOURS[r.choice(len(_EYE_COLOURS), p=_EYE_PROBS[group])]
    eye = np.clip(eye + r.normal(0.0, 6.0, 3), 0, 255)
    lip_red = np.array((196.0, 92.0, 96.0)) if group < 2 else np.array((120.0, 60.0, 62.0))
    lip = skin + r.uniform(0.35, 0.6) * (lip_red - skin)
    return IdentityFactors(
        index=int(identity),
        skin_tone=tone,
        skin_rgb=_tup(skin),
        face_width=float(r.uniform(0.66, 0.80)),
        face_length=float(r.uniform(0.94, 1.06)),
        jaw_taper=float(r.uniform(0.0, 1.0)),
        jaw_square=float(r.uniform(0.55, 1.0)),
        hair_rgb=_tup(hair),
        hair_style=HAIR_STYLES[int(r.integers(len(HAIR_STYLES)))],
        hair_volume=float(r.uniform(0.7, 1.3)),
        grey_onset=float(r.uniform(38.0, 52.0)),
        balding=float(r.uniform(0.25, 1.0)),
        eye_spacing=float(r.uniform(0.9, 1.1)),
        eye_size=float(r.uniform(0.88, 1.12)),
        eye_rgb=_tup(eye),
        nose_width=float(r.uniform(0.82, 1.25)),
        nose_length=float(r.uniform(0.88, 1.12)),
        brow_thickness=float(r.uniform(0.75, 1.35)),
        brow_arch=float(r.uniform(0.0, 1.0)),
        brow_height=float(r.uniform(-0.02, 0.02)),
        mouth_width=float(r.uniform(0.88, 1.12)),
        lip_fullness=float(r.uniform(0.75, 1.3)),
        lip_rgb=_tup(lip),
        rest_curve=float(r.uniform(-0.14, 0.14)),
        ear_size=float(r.uniform(0.9, 1.1)),
        wrinkle_seed=int(r.integers(2**31)),
    )


def identity_of(spec: SynthFacesSpec, index: int) -> int:
    """The person (0..num_identities-1) of sample `index` (biased draws: module docstring)."""
    if spec.severity is not None:
        split, value = biased_cell(spec, index)
        pool = _spurious_pools(spec.seed, spec.num_identities, spec.split_fractions,
                               spec.spurious_levels)[(split, value)]
        if not len(pool):
            raise ValueError(f"SynthFacesSpec: no person of split {split!r} has spurious value "
                             f"{SPURIOUS_VALUES[spec.spurious_levels][value]!r}; raise "
                             f"num_identities ({spec.num_identities})")
        return int(pool[int(_rng(spec.seed, index, _TAG_PICK).integers(len(pool)))])
    return int(_rng(spec.seed, index, _TAG_PICK).integers(spec.num_identities))


def spurious_index(levels: int, skin_tone: float) -> int:
    """The spurious value (index into SPURIOUS_VALUES[levels]) of a person's skin tone."""
    return min(int(skin_tone * levels), levels - 1)


@lru_cache(maxsize=16)
def _spurious_pools(seed: int, num_identities: int, fractions: tuple[float, float, float],
                    levels: int) -> dict[tuple[str, int], np.ndarray]:
    """{(split, spurious value): the people of that split and value}."""
    pools: dict[tuple[str, int], list[int]] = {
        (split, v): [] for split in ("train", "val", "test") for v in range(levels)}
    for person in range(num_identities):
        tone = identity_factors(seed, person).skin_tone
        pools[(_split_of(seed, person, fractions), spurious_index(levels, tone))].append(person)
    return {key: np.asarray(people, dtype=np.int64) for key, people in pools.items()}


def drawn_class(spec: SynthFacesSpec, index: int) -> int:
    """The class of sample `index`: the first draw of its sample stream (the age bin or the
    expression), known before its person is picked."""
    n = len(spec.age_bins) if spec.task == "age" else len(EXPRESSION_CLASSES)
    return int(_rng(spec.seed, index, _TAG_SAMPLE).integers(n))


def biased_cell(spec: SynthFacesSpec, index: int) -> tuple[str, int]:
    """(split, spurious value index) of sample `index` of a biased draw (module docstring)."""
    if spec.severity is None:
        raise ValueError("biased_cell: the spec has no severity")
    r = _rng(spec.seed, index, _TAG_BIAS)
    u, train_frac, val_frac = float(r.random()), *spec.split_fractions[:2]
    split = "train" if u < train_frac else "val" if u < train_frac + val_frac else "test"
    levels = spec.spurious_levels
    if split != "train":
        return split, int(r.integers(levels))
    majority = drawn_class(spec, index) % levels
    if r.random() < spec.severity:
        return split, majority
    others = [v for v in range(levels) if v != majority]
    return split, others[int(r.integers(len(others)))]


@lru_cache(maxsize=65536)
def _split_of(seed: int, identity: int, fractions: tuple[float, float, float]) -> str:
    u = float(_rng(seed, identity, _TAG_SPLIT).random())
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def split_of(spec: SynthFacesSpec, identity: int) -> str:
    """train / val / test of a person: a hash of (seed, identity), so splits share nobody."""
    return _split_of(spec.seed, int(identity), spec.split_fractions)


def _intensity(r: np.random.Generator) -> float:
    lo, hi = WEAK_INTENSITY if r.random() < WEAK_FRACTION else CLEAR_INTENSITY
    return float(r.uniform(lo, hi))


def sample_factors(spec: SynthFacesSpec, index: int) -> FaceFactors:
    """The factors of sample `index` of the data set described by `spec`."""
    index = int(index)
    if index < 0:
        raise ValueError(f"sample index {index} is negative")
    person = identity_factors(spec.seed, identity_of(spec, index))
    r = _rng(spec.seed, index, _TAG_SAMPLE)
    if spec.task == "age":
        lo, hi = spec.age_bins[int(r.integers(len(spec.age_bins)))]
        age = float(r.uniform(lo, hi))
        expression = int(r.integers(len(EXPRESSION_CLASSES)))
    else:
        expression = int(r.integers(len(EXPRESSION_CLASSES)))
        age = float(r.uniform(*AGE_RANGE))
    intensity = _intensity(r)
    if expression == NEUTRAL:
        intensity = 0.0
    c1 = r.uniform(20.0, 235.0, 3)
    c2 = np.clip(c1 + r.normal(0.0, 50.0, 3), 0, 255)
    return FaceFactors(
        identity=person,
        age=age,
        expression=expression,
        intensity=intensity,
        shift=(float(r.uniform(-0.045, 0.045)), float(r.uniform(-0.04, 0.04))),
        scale=float(r.uniform(0.92, 1.06)),
        roll=float(np.clip(r.normal(0.0, 0.09), -0.22, 0.22)),
        yaw=float(r.uniform(-0.3, 0.3)),
        gaze=(float(r.uniform(-1.0, 1.0)), float(r.uniform(-0.5, 0.5))),
        light_angle=float(r.uniform(0.0, 2.0 * math.pi)),
        light_strength=float(r.uniform(0.0, 0.32)),
        exposure=float(r.uniform(0.86, 1.1)),
        background_kind=int(r.integers(3)),
        background_rgb=(_tup(c1), _tup(c2)),
        background_angle=float(r.uniform(0.0, 2.0 * math.pi)),
        clothing_rgb=_tup(r.uniform(20.0, 230.0, 3)),
        micro=(
            float(np.clip(r.normal(0.0, 0.06), -0.12, 0.12)),
            float(np.clip(r.normal(0.0, 0.012), -0.025, 0.025)),
            float(np.clip(r.normal(0.0, 0.06), -0.12, 0.12)),
        ),
        noise_sigma=float(r.uniform(0.0, 3.0)),
        noise_seed=int(r.integers(2**31)),
        expression_gain=spec.expression_gain,
    )


def label_of(spec: SynthFacesSpec, factors: FaceFactors) -> int:
    """The true class of `factors` under `spec`'s task; ValueError for an age in no bin."""
    if spec.task == "expression":
        return int(factors.expression)
    for k, (lo, hi) in enumerate(spec.age_bins):
        if lo <= factors.age < hi or (k == len(spec.age_bins) - 1 and factors.age == hi):
            return k
    raise ValueError(f"age {factors.age:g} lies in none of the age bins {spec.age_bins}")


# --------------------------------------------------------------------------------------------
# rendering


def _mix(a, b, t: float) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a + float(t) * (np.asarray(b, dtype=np.float64) - a)


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _smoothstep(x: float) -> float:
    x = min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def _clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


class _Pen:
    """Draws face-local shapes (x right, y down, unit = half the head height) into the
    supersampled RGBA image and, optionally, the region mask, through the pose transform."""

    def __init__(self, size: int, f: FaceFactors, half_width: float, with_mask: bool) -> None:
        self.size = size
        self.unit = size * 0.34 * f.scale
        self.cx = size * (0.5 + f.shift[0])
        self.cy = size * (0.46 + f.shift[1])
        self.cr, self.sr = math.cos(f.roll), math.sin(f.roll)
        self.cyaw, self.syaw = math.cos(f.yaw), math.sin(f.yaw)
        self.half_width = half_width
        self.inv_w = 1.0 / half_width
        self.ucr, self.usr = self.unit * self.cr, self.unit * self.sr
        self.depth = 0.8 * half_width
        self.img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.img)
        self.mask = Image.new("L", (size, size), REGIONS["background"]) if with_mask else None
        self.mdraw = ImageDraw.Draw(self.mask) if self.mask is not None else None

    def xy(self, x, y, z=None) -> list[float]:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if z is None:  # on the head ellipsoid
            q = x * self.inv_w
            r = y * (1.0 / 1.05)
            z = self.depth * np.sqrt(np.maximum(1.0 - q * q - r * r, 0.0))
        xr = x * self.cyaw + z * self.syaw
        out = np.empty((x.size, 2))
        out[:, 0] = self.cx + self.ucr * xr - self.usr * y
        out[:, 1] = self.cy + self.usr * xr + self.ucr * y
        return out.ravel().tolist()

    def poly(self, x, y, rgb, region: str | None, z=None) -> None:
        pts = self.xy(x, y, z)
        if rgb is not None:
            self.draw.polygon(pts, fill=_rgba(rgb))
        if region is not None and self.mdraw is not None:
            self.mdraw.polygon(pts, fill=REGIONS[region])

    def line(self, x, y, rgb, width: float, region: str | None = None, z=None) -> None:
        pts = self.xy(x, y, z)
        w = max(1, int(round(width * self.unit)))
        self.draw.line(pts, fill=_rgba(rgb), width=w, joint="curve")
        if region is not None and self.mdraw is not None:
            self.mdraw.line(pts, fill=REGIONS[region], width=w, joint="curve")

    def ellipse(self, cx, cy, rx, ry, rgb, region: str | None, n: int = 20, z=None) -> None:
        t = _lin(0.0, 2.0 * math.pi, n, False)
        self.poly(cx + rx * np.cos(t), cy + ry * np.sin(t), rgb, region, z)


def _rgba(rgb) -> tuple[int, int, int, int]:
    if isinstance(rgb, np.ndarray):
        rgb = rgb.tolist()
    r, g, b = rgb
    return (
        int(min(max(r, 0.0), 255.0) + 0.5),
        int(min(max(g, 0.0), 255.0) + 0.5),
        int(min(max(b, 0.0), 255.0) + 0.5),
        255,
    )


@lru_cache(maxsize=64)
def _lin(start: float, stop: float, num: int, endpoint: bool = True) -> np.ndarray:
    """np.linspace for the constant ranges the drawing uses (cached, read-only)."""
    out = np.linspace(start, stop, num, endpoint=endpoint)
    out.setflags(write=False)
    return out


@dataclass
class _Geometry:
    """Face-local layout for one sample (age and expression applied)."""

    g: float  # growth 0 (newborn) .. 1 (adult)
    old: float  # 0 (<= 40) .. 1 (80)
    wrinkles: float
    grey: float
    recession: float
    W: float
    h_bot: float
    taper: float
    square: float
    eye_y: float
    eye_dx: float
    eye_rw: float
    eye_rh: float
    eye_open: float
    iris_r: float
    brow_y: float
    brow_th: float
    brow_arch: float
    brow_inner: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w: float
    curve: float
    mouth_open: float
    teeth: bool
    lip_t: float
    cheek: float
    hairline_y: float
    skin: np.ndarray
    hair: np.ndarray


def shown_intensity(intensity: float, gain: float) -> float:
    """The intensity the face shows: `gain` stretches what lies above the weak (ambiguous) band,
    so clear expressions grow while weak ones stay as ambiguous as drawn."""
    return intensity + (gain - 1.0) * max(0.0, intensity - WEAK_INTENSITY[1])


def _geometry(f: FaceFactors) -> _Geometry:
    p = f.identity
    a = f.age
    g = _smoothstep(a / 20.0)
    old = _clip01((a - 40.0) / 40.0)
    wrinkles = _clip01((a - 28.0) / 47.0) ** 1.1
    grey = _clip01((a - p.grey_onset) / 26.0)
    recession = _clip01((a - 48.0) / 27.0) * p.balding

    s = shown_intensity(f.intensity, f.expression_gain)
    e = f.expression
    curve = p.rest_curve + f.micro[0]
    mouth_open, width, brow_up, brow_inner, eye_open, cheek = 0.0, 1.0, f.micro[1], 0.0, 1.0, 0.0
    eye_open += f.micro[2]
    arch_extra = 0.0
    # Above intensity 1 (expression_gain > 1) the mouth carries the gain; brows, eyes and mouth
    # width stop where the face would stop looking like one (brows in the hair, a closed O).
    if e == HAPPY:
        curve += 1.1 * s
        width += 0.22 * min(s, 1.5)
        mouth_open = 0.7 * _clip01((s - 0.4) / 0.6)
        eye_open -= 0.35 * s
        cheek = s
        brow_up += 0.01 * min(s, 1.0)
    elif e == SURPRISED:
        mouth_open = 1.2 * min(s, 2.0)
        width -= 0.4 * min(s, 1.0)
        brow_up += 0.15 * min(s, 1.5)
        arch_extra = 0.05 * min(s, 2.0)
        eye_open += 0.6 * min(s, 1.3)
    elif e == SAD:
        curve -= 1.0 * s
        width -= 0.06 * min(s, 1.0)
        brow_inner = 0.14 * min(s, 1.8)
        eye_open -= 0.25 * s
        brow_up -= 0.01 * min(s, 1.0)

    skin = np.asarray(p.skin_rgb)
    if old > 0:  # slightly sallower, less saturated skin
        grey_skin = np.full(3, skin.mean())
        skin = _mix(skin, grey_skin, 0.18 * old) * (1.0 - 0.05 * old)
    hair = _mix(p.hair_rgb, _mix(_GREY_HAIR, _WHITE_HAIR, _clip01((a - 65.0) / 15.0)), grey)

    eye_y = _lerp(0.22, -0.02, g)
    eye_rw = _lerp(0.185, 0.13, g) * p.eye_size
    return _Geometry(
        g=g,
        old=old,
        wrinkles=wrinkles,
        grey=grey,
        recession=recession,
        W=_lerp(0.9, p.face_width, g) + 0.02 * old,
        h_bot=_lerp(0.76, p.face_length, g),
        taper=_lerp(0.05, 0.12 + 0.3 * p.jaw_taper, g),
        square=_lerp(0.7, p.jaw_square, g),
        eye_y=eye_y,
        eye_dx=_lerp(0.33, 0.29 * p.eye_spacing, g),
        eye_rw=eye_rw,
        eye_rh=eye_rw * _lerp(0.72, 0.5, g),
        eye_open=max(0.2, eye_open * (1.0 - 0.18 * old)),
        iris_r=eye_rw * _lerp(0.6, 0.45, g),
        brow_y=eye_y - _lerp(0.2, 0.17, g) + p.brow_height - brow_up,
        brow_th=_lerp(0.022, 0.045, g) * p.brow_thickness * (1.0 - 0.2 * old),
        brow_arch=0.02 + 0.04 * p.brow_arch + arch_extra,
        brow_inner=brow_inner,
        nose_y=eye_y + _lerp(0.2, 0.37, g) * p.nose_length * (1.0 + 0.06 * old),
        nose_w=_lerp(0.06, 0.095, g) * p.nose_width * (1.0 + 0.12 * old),
        mouth_y=eye_y + _lerp(0.34, 0.6, g) + 0.02 * old,
        mouth_w=_lerp(0.15, 0.22, g) * p.mouth_width * width,
        curve=curve,
        mouth_open=mouth_open,
        teeth=e == HAPPY,
        lip_t=_lerp(0.034, 0.04, g) * p.lip_fullness * (1.0 - 0.45 * old),
        cheek=cheek,
        hairline_y=_lerp(-0.4, -0.56, g) - 0.32 * recession,
        skin=skin,
        hair=hair,
    )


def _face_outline(geo: _Geometry, n: int = 56) -> tuple[np.ndarray, np.ndarray]:
    t = _lin(0.0, 2.0 * math.pi, n, False)
    c, s = np.cos(t), np.sin(t)
    lower = s > 0
    x = geo.W * c
    y = 1.0 * s
    cl = np.sign(c[lower]) * np.abs(c[lower]) ** geo.square
    jowl = 1.0 + 0.05 * geo.old * np.sin(math.pi * s[lower])
    x[lower] = geo.W * cl * (1.0 - geo.taper * s[lower] ** 2) * jowl
    y[lower] = geo.h_bot * s[lower]
    return x, y


def _draw_hair_back(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    style = f.identity.hair_style
    vol = 0.1 * f.identity.hair_volume
    W = geo.W
    if style == "long":
        bottom, width = 1.45, W + 0.16
    elif style == "bob":
        bottom, width = 0.62, W + 0.14
    elif style == "curly":
        bottom, width = 0.55, W + 0.2 + vol
    else:
        return
    t = _lin(math.pi, 2.0 * math.pi, 25)
    x = list(width * np.cos(t))
    y = list(-0.05 + (1.0 + vol) * np.sin(t))
    x += [width + 0.04, -width - 0.04]
    y += [bottom, bottom]
    x, y = np.array(x), np.array(y)
    if style == "curly":  # a bumpy mass of hair around the head
        t = _lin(0.0, 2.0 * math.pi, 48, False)
        r = 1.0 + 0.05 * np.sin(t * 12.0)
        x = (width + 0.04) * r * np.cos(t)
        y = -0.12 + (0.95 + vol) * r * np.sin(t)
    colour = geo.hair * 0.82
    pen.poly(x, y, colour, "hair", z=0.0)


def _draw_body(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    nw = geo.W * _lerp(0.46, 0.52, geo.g)
    ny = geo.h_bot
    pen.poly(
        [-nw, nw, nw * 1.05, -nw * 1.05],
        [0.3, 0.3, ny + 0.6, ny + 0.6],
        geo.skin * 0.86,
        "skin",
        z=0.0,
    )
    # shadow under the chin
    pen.ellipse(0.0, ny - 0.02, nw * 1.02, 0.14, geo.skin * 0.72, "skin", z=0.0)
    sw = _lerp(1.05, 1.55, geo.g)
    top = ny + 0.3
    x = np.array([-sw - 0.3, -sw, -nw * 1.6, -nw * 0.6, 0.0, nw * 0.6, nw * 1.6, sw, sw + 0.3])
    y = np.array([3.0, top + 0.3, top, top + 0.05, top + 0.22, top + 0.05, top, top + 0.3, 3.0])
    pen.poly(x, y, f.clothing_rgb, "background", z=0.0)


def _draw_ears(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    size = f.identity.ear_size * _lerp(0.9, 1.0, geo.g) * (1.0 + 0.1 * geo.old)
    ey = geo.eye_y + 0.1
    for side in (-1.0, 1.0):
        cx = side * (geo.W * 0.98)
        pen.ellipse(cx, ey, 0.085 * size, 0.17 * size, geo.skin * 0.9, "skin", z=0.0)
        pen.ellipse(cx + side * 0.015, ey, 0.04 * size, 0.11 * size, geo.skin * 0.74, None, z=0.0)


def _draw_face(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    x, y = _face_outline(geo)
    pen.poly(x, y, geo.skin, "skin", z=0.0)
    # soft cheek blush: children, and smiles
    blush = 0.22 * (1.0 - geo.g) + 0.08 * geo.cheek
    if blush > 0.02:
        colour = _mix(geo.skin, (226, 110, 110), blush)
        cy = geo.eye_y + _lerp(0.22, 0.28, geo.g) - 0.03 * geo.cheek
        for side in (-1.0, 1.0):
            pen.ellipse(side * (geo.eye_dx + 0.04), cy, 0.1, 0.065, colour, None)


def _draw_wrinkles(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    w = geo.wrinkles
    r = np.random.default_rng([f.identity.wrinkle_seed])
    wob = r.uniform(-1.0, 1.0, 8)
    skin = geo.skin
    if w > 0.03:
        dark = skin * (1.0 - 0.42 * w)
        lw = 0.024 + 0.018 * w
        # forehead lines
        top = geo.hairline_y + 0.09
        bottom = geo.brow_y - 0.1
        n = 1 + int(round(2.0 * w))
        if bottom > top:
            xs = _lin(-0.3, 0.3, 9)
            for k in range(n):
                yk = bottom - (bottom - top) * (k / max(n, 2)) * 1.2
                if yk < top:
                    break
                span = 1.0 - 0.15 * k
                ys = yk - 0.03 * (1.0 - (xs / 0.3) ** 2) + 0.008 * wob[k] * np.sin(xs * 9.0)
                pen.line(xs * span, ys, dark, lw)
        # crow's feet
        for side in (-1.0, 1.0):
            ox = side * (geo.eye_dx + geo.eye_rw + 0.03)
            for ang in (-0.45, 0.0, 0.45):
                ln = 0.05 + 0.05 * w
                pen.line(
                    [ox, ox + side * ln * math.cos(ang)],
                    [geo.eye_y, geo.eye_y + ln * math.sin(ang)],
                    dark,
                    lw * 0.8,
                )
    # nasolabial folds: with age and with smiling
    fold = max(_clip01((f.age - 26.0) / 40.0), 0.45 * geo.cheek * geo.g)
    if fold > 0.03:
        dark = skin * (1.0 - 0.4 * fold)
        for side in (-1.0, 1.0):
            t = _lin(0.0, 1.0, 7)
            x0, y0 = side * (geo.nose_w + 0.05), geo.nose_y - 0.03
            x1, y1 = side * (geo.mouth_w + 0.05), geo.mouth_y + 0.06
            x = x0 + (x1 - x0) * t + side * 0.05 * np.sin(math.pi * t)
            y = y0 + (y1 - y0) * t
            pen.line(x, y, dark, 0.026 + 0.02 * fold)
    # eye bags
    bags = _clip01((f.age - 42.0) / 30.0)
    if bags > 0.03:
        dark = skin * (1.0 - 0.32 * bags)
        for side in (-1.0, 1.0):
            t = _lin(0.15, 0.85, 7)
            x = side * geo.eye_dx + (t - 0.5) * 2.0 * geo.eye_rw
            y = geo.eye_y + geo.eye_rh * 0.8 + 0.05 + 0.03 * np.sin(math.pi * t)
            pen.line(x, y, dark, 0.022 + 0.012 * bags)
    # marionette lines and age spots
    late = _clip01((f.age - 55.0) / 20.0)
    if late > 0.03:
        dark = skin * (1.0 - 0.4 * late)
        for side in (-1.0, 1.0):
            x0 = side * (geo.mouth_w + 0.01)
            pen.line([x0, x0 + side * 0.03], [geo.mouth_y + 0.04, geo.mouth_y + 0.2], dark, 0.024)
        spots = r.uniform(-1.0, 1.0, (6, 2))
        spot = _mix(skin, (120, 80, 50), 0.35 * late)
        for sx, sy in spots[: int(2 + 4 * late)]:
            # on a cheek (sy > 0) or on the forehead
            y = geo.eye_y + 0.2 + 0.12 * sy if sy > 0 else geo.brow_y - 0.12 + 0.06 * sy
            pen.ellipse(sx * geo.W * 0.6, y, 0.022, 0.018, spot, None, n=10)


def _draw_nose(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    skin = geo.skin
    ty, nw = geo.nose_y, geo.nose_w
    top = geo.eye_y + 0.03
    pen.poly(
        [-0.045, 0.045, nw * 1.05, nw * 0.8, -nw * 0.8, -nw * 1.05],
        [top, top, ty - 0.01, ty + 0.05, ty + 0.05, ty - 0.01],
        None,
        "nose",
    )
    # shadow on the side away from the light
    side = -1.0 if math.cos(f.light_angle) > 0 else 1.0
    pen.line(
        [side * 0.04, side * 0.05, side * nw * 0.85],
        [top + 0.05, ty - 0.1, ty - 0.02],
        skin * 0.84,
        0.03,
    )
    pen.ellipse(0.0, ty + 0.045, nw * 0.9, 0.03, skin * 0.82, None)  # shadow under the tip
    for s in (-1.0, 1.0):
        pen.ellipse(s * nw * 0.7, ty, nw * 0.42, 0.045, skin * 0.9, None)  # alae
    pen.ellipse(0.0, ty - 0.005, nw * 0.5, 0.045, skin * 1.05, None)  # tip highlight
    for s in (-1.0, 1.0):
        pen.ellipse(s * nw * 0.42, ty + 0.03, nw * 0.26, 0.016, skin * 0.42, None, n=12)


def _draw_eyes(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    skin = geo.skin
    t = _lin(0.0, 1.0, 15)
    sin = np.sin(math.pi * t)
    lid = (36, 26, 24)
    for side in (-1.0, 1.0):
        cx, cy = side * geo.eye_dx, geo.eye_y
        x = cx + (t - 0.5) * 2.0 * geo.eye_rw
        up = cy - geo.eye_rh * geo.eye_open * sin**0.8
        lo = cy + geo.eye_rh * 0.62 * sin
        # socket shadow / lid crease above the eye
        crease = cy - geo.eye_rh * max(geo.eye_open, 0.7) - 0.035 - 0.01 * geo.old
        pen.line(x[2:-2], np.full(11, crease), skin * 0.84, 0.024 + 0.012 * geo.old)
        pen.poly(
            np.concatenate([x, x[::-1]]), np.concatenate([up, lo[::-1]]), (236, 234, 228), "eyes"
        )
        ix = cx + f.gaze[0] * geo.eye_rw * 0.25
        iy = cy + f.gaze[1] * geo.eye_rh * 0.2
        for radius, colour in ((geo.iris_r, f.identity.eye_rgb), (geo.iris_r * 0.45, (14, 10, 10))):
            a = _lin(0.0, 2.0 * math.pi, 18, False)
            px = np.clip(ix + radius * np.cos(a), x[0], x[-1])
            py = np.clip(iy + radius * np.sin(a), np.interp(px, x, up), np.interp(px, x, lo))
            pen.poly(px, py, colour, None)
        if geo.eye_open > 0.45:
            pen.ellipse(
                ix + 0.3 * geo.iris_r,
                iy - 0.3 * geo.iris_r,
                geo.iris_r * 0.22,
                geo.iris_r * 0.22,
                (250, 250, 250),
                None,
                n=8,
            )
        pen.line(x, up, lid, 0.03)  # upper lid and lashes
        pen.line(x[3:-3], lo[3:-3], skin * 0.7, 0.014)


def _draw_brows(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    colour = _mix(geo.hair * 0.75, (230, 228, 224), 0.5 * geo.grey)
    t = _lin(0.0, 1.0, 9)  # 0 inner end .. 1 outer end
    inner = geo.eye_dx - geo.eye_rw * 0.85
    outer = geo.eye_dx + geo.eye_rw * 1.15
    for side in (-1.0, 1.0):
        x = side * (inner + t * (outer - inner))
        y = (
            geo.brow_y
            - geo.brow_arch * np.sin(math.pi * (0.15 + 0.7 * t))
            - geo.brow_inner * (1.0 - t) ** 1.5
            + 0.45 * geo.brow_inner * t
            + 0.015 * t
        )
        th = geo.brow_th * (1.0 - 0.5 * t)
        pen.poly(
            np.concatenate([x, x[::-1]]),
            np.concatenate([y - th, (y + th * 0.8)[::-1]]),
            colour,
            "brows",
        )


def _draw_mouth(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    n = 21
    t = _lin(-1.0, 1.0, n)
    x = t * geo.mouth_w
    prof = np.sqrt(np.clip(1.0 - t**2, 0.0, None))
    mid = geo.mouth_y - geo.curve * 0.11 * t**2 + 0.02 * geo.curve
    open_h = geo.mouth_open * 0.2
    up_in = mid - open_h * 0.35 * prof
    lo_in = mid + open_h * 0.65 * prof
    bow = 1.0 - 0.3 * np.exp(-((t / 0.18) ** 2))
    up_out = up_in - geo.lip_t * prof**0.6 * bow
    lo_out = lo_in + geo.lip_t * 1.35 * prof**0.7
    lips = np.asarray(f.identity.lip_rgb)
    lips = _mix(lips, geo.skin, 0.35 * geo.old)
    pen.poly(
        np.concatenate([x, x[::-1]]), np.concatenate([up_out, lo_out[::-1]]), lips * 0.9, "mouth"
    )
    pen.poly(np.concatenate([x, x[::-1]]), np.concatenate([lo_in, lo_out[::-1]]), lips, None)
    dark = (58, 24, 28)
    if open_h > 0.012:
        pen.poly(np.concatenate([x, x[::-1]]), np.concatenate([up_in, lo_in[::-1]]), dark, "mouth")
        if geo.teeth:
            tooth = np.minimum(up_in + open_h * 0.45 * prof, lo_in)
            pen.poly(
                np.concatenate([x[2:-2], x[2:-2][::-1]]),
                np.concatenate([up_in[2:-2], tooth[2:-2][::-1]]),
                (238, 234, 222),
                None,
            )
    else:
        pen.line(x, mid, lips * 0.5, 0.022)


def _draw_hair_top(pen: _Pen, f: FaceFactors, geo: _Geometry) -> None:
    p = f.identity
    style = p.hair_style
    W = geo.W
    vol = {"cropped": 0.025, "short": 0.08, "long": 0.09, "bob": 0.1, "curly": 0.16}[style]
    vol *= p.hair_volume
    rec = geo.recession
    colour = geo.hair
    if style == "cropped":
        colour = _mix(colour, geo.skin, 0.25)
    # thinning: the top shows scalp through the hair
    top_colour = _mix(colour, geo.skin * 0.95, 0.55 * rec)
    side_y = geo.eye_y - 0.04
    hl = geo.hairline_y
    if style == "bob":
        hl = max(hl, geo.eye_y - 0.42)  # a fringe that stops above the brows
    temple_y = hl + 0.1 - 0.2 * rec
    # outer contour: from the left side, over the top, to the right side
    a0 = math.asin(max(-1.0, min(1.0, side_y / (1.0 + vol))))
    t = np.linspace(math.pi - a0, 2.0 * math.pi + a0, 33)
    ox = (W + vol * 0.8) * np.cos(t)
    oy = -0.03 + (1.0 + vol) * np.sin(t)
    if style == "curly":
        bump = 1.0 + 0.05 * np.sin(t * 11.0)
        ox, oy = ox * bump, oy * bump
    # inner contour (the hairline), right to left
    xs = _lin(0.86, -0.86, 15) * W
    ys = hl + (temple_y - hl) * (xs / (0.86 * W)) ** 2
    if style == "bob":  # straight fringe
        ys = np.minimum(ys, hl + 0.03 * np.abs(xs / W))
    ix = np.concatenate([[W * 0.99], xs, [-W * 0.99]])
    iy = np.concatenate([[side_y], ys, [side_y]])
    if rec > 0.7:
        # horseshoe: hair only at the sides and back, bald crown
        for side in (-1.0, 1.0):
            sel = side * ox > W * 0.55
            hx = np.concatenate([ox[sel], [side * W * 0.99, side * W * 0.8]])
            hy = np.concatenate([oy[sel], [side_y, side_y - 0.3]])
            pen.poly(hx, hy, colour, "hair", z=0.0)
        return
    pen.poly(np.concatenate([ox, ix]), np.concatenate([oy, iy]), top_colour, "hair", z=0.0)
    # a few strands for texture
    strand = top_colour * 0.8
    top = max(hl - 0.3, -0.8)
    for k in range(3):
        sx = (-0.4 + 0.4 * k) * W
        pen.line([sx, sx + 0.12], [top, hl - 0.05], strand, 0.02, "hair", z=0.0)


def render(
    factors: FaceFactors, resolution: int, with_mask: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw one face: (H, W, 3) uint8 RGB and, with `with_mask`, the (H, W) uint8 region map."""
    if not MIN_RESOLUTION <= int(resolution) <= MAX_RESOLUTION:
        raise ValueError(f"resolution {resolution} is outside [{MIN_RESOLUTION}, {MAX_RESOLUTION}]")
    res = int(resolution)
    f = factors
    geo = _geometry(f)
    pen = _Pen(res * SUPERSAMPLE, f, geo.W, with_mask)
    _draw_hair_back(pen, f, geo)
    _draw_body(pen, f, geo)
    _draw_ears(pen, f, geo)
    _draw_face(pen, f, geo)
    _draw_wrinkles(pen, f, geo)
    _draw_nose(pen, f, geo)
    _draw_eyes(pen, f, geo)
    _draw_brows(pen, f, geo)
    _draw_mouth(pen, f, geo)
    _draw_hair_top(pen, f, geo)

    person = np.asarray(
        pen.img.resize((res, res), Image.LANCZOS, reducing_gap=2.0), dtype=np.float32
    )
    alpha = person[:, :, 3:4] / 255.0
    gy, gx = _grid(res)
    # shading gradient across the person, lit from `light_angle`
    lx, ly = math.cos(f.light_angle), math.sin(f.light_angle)
    fcx = pen.cx / pen.size * 2.0 - 1.0
    fcy = pen.cy / pen.size * 2.0 - 1.0
    radius = 2.0 * pen.unit / pen.size
    d = np.clip(((gx - fcx) * lx + (gy - fcy) * ly) / radius, -1.3, 1.3)
    shade = (f.exposure * (1.0 + f.light_strength * d))[:, :, None]
    bg = _background(f, res) * (1.0 + 0.3 * f.light_strength * d)[:, :, None]
    out = bg * (1.0 - alpha) + person[:, :, :3] * shade * alpha
    if f.noise_sigma > 0:
        out = out + np.random.default_rng([f.noise_seed]).normal(0.0, f.noise_sigma, out.shape)
    image = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask = None
    if pen.mask is not None:
        mask = np.asarray(pen.mask.resize((res, res), Image.NEAREST), dtype=np.uint8)
    return image, mask


@lru_cache(maxsize=8)
def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0
    gy, gx = np.meshgrid(c, c, indexing="ij")
    gy.setflags(write=False)
    gx.setflags(write=False)
    return gy, gx


def _background(f: FaceFactors, res: int) -> np.ndarray:
    c1 = np.asarray(f.background_rgb[0], dtype=np.float32)
    c2 = np.asarray(f.background_rgb[1], dtype=np.float32)
    if f.background_kind == 0:
        return np.broadcast_to(c1, (res, res, 3))
    gy, gx = _grid(res)
    if f.background_kind == 1:
        a = f.background_angle
        t = np.clip((gx * math.cos(a) + gy * math.sin(a)) * 0.5 + 0.5, 0.0, 1.0)
    else:
        t = np.clip(np.sqrt(gx**2 + gy**2) / 1.4, 0.0, 1.0)
    return c1 + t[:, :, None] * (c2 - c1)


# --------------------------------------------------------------------------------------------
# manifest rows and previews


def generate_batch(spec: SynthFacesSpec, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Manifest rows (manifest.py columns plus the synthfaces ones) for sample `indices`; a
    biased draw's `group` is the (class, spurious value) cell and it adds `spurious`."""
    idx = np.asarray(indices).reshape(-1)
    n = len(idx)
    cols: dict[str, list] = {
        k: []
        for k in (
            "sample_id",
            "split",
            "label",
            "image",
            "group",
            "identity",
            "age",
            "expression",
            "expression_intensity",
            "mask",
        )
    }
    for index in idx.tolist():
        f = sample_factors(spec, int(index))
        image, mask = render(f, spec.resolution, spec.with_masks)
        cols["sample_id"].append(f"sf{spec.seed}_{int(index):07d}")
        cols["split"].append(split_of(spec, f.identity.index))
        cols["label"].append(label_of(spec, f))
        cols["image"].append(encode_png(image))
        cols["group"].append(_group_of(spec, f))
        cols["identity"].append(f.identity.identity)
        cols["age"].append(f.age)
        cols["expression"].append(f.expression_name)
        cols["expression_intensity"].append(f.intensity)
        cols["mask"].append(encode_png(mask) if mask is not None else None)

    def obj(values: list) -> np.ndarray:
        out = np.empty(n, dtype=object)
        out[:] = values
        return out

    label = np.asarray(cols["label"], dtype=np.int32).reshape(n)
    extra = {}
    if spec.severity is not None:  # the spurious value alone (the group column is the cell)
        extra["spurious"] = obj([g.split("|", 1)[1] for g in cols["group"]])
    return {
        "sample_id": obj(cols["sample_id"]),
        "split": obj(cols["split"]),
        "label": label,
        "label_clean": label.copy(),
        "is_corrupted": np.zeros(n, dtype=bool),
        "image": obj(cols["image"]),
        "image_uri": obj([None] * n),
        "group": obj(cols["group"]),
        "identity": obj(cols["identity"]),
        "age": np.asarray(cols["age"], dtype=np.float64).reshape(n),
        "expression": obj(cols["expression"]),
        "expression_intensity": np.asarray(cols["expression_intensity"], np.float64).reshape(n),
        "mask": obj(cols["mask"]),
        **extra,
    }


def _group_of(spec: SynthFacesSpec, f: FaceFactors) -> str:
    """The plain draw's skin-tone group, or a biased draw's cell "<class name>|<value>"."""
    if spec.severity is None:
        return f.identity.group
    values = SPURIOUS_VALUES[spec.spurious_levels]
    value = values[spurious_index(spec.spurious_levels, f.identity.skin_tone)]
    return f"{class_names(spec)[label_of(spec, f)]}|{value}"


def preview_grid(spec: SynthFacesSpec, per_class: int = 8) -> bytes:
    """PNG: one row per class, labelled with its class name, `per_class` samples each (the
    first sample indices of that class, in index order)."""
    if per_class < 1:
        raise ValueError(f"per_class {per_class} must be >= 1")
    names = class_names(spec)
    found: list[list[FaceFactors]] = [[] for _ in names]
    index = 0
    while any(len(row) < per_class for row in found):
        f = sample_factors(spec, index)
        row = found[label_of(spec, f)]
        if len(row) < per_class:
            row.append(f)
        index += 1
        if index > 1000 * per_class * len(names):
            raise RuntimeError(f"preview_grid: could not find {per_class} samples of each class")
    res = spec.resolution
    label_w = 78
    sheet = Image.new("RGB", (label_w + per_class * res, len(names) * res), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (name, row) in enumerate(zip(names, found, strict=True)):
        text = name
        if spec.task == "age":
            lo, hi = spec.age_bins[r]
            text = f"{name}\n{lo:g}-{hi:g}"
        draw.multiline_text((4, r * res + res // 2 - 10), text, fill=(0, 0, 0), font=font)
        for c, f in enumerate(row):
            image, _ = render(f, res, False)
            sheet.paste(Image.fromarray(image), (label_w + c * res, r * res))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
