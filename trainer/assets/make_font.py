"""Makes DejaVuSans-subset.ttf, the font of `upcycle report`'s plots (run once; needs fontTools).

    python make_font.py /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf DejaVuSans-subset.ttf

Keeps Latin-1 and a few symbols. plotters' ab_glyph text (0.3.7) places each glyph's ink
at the pen position, dropping its left side bearing, which squeezes and gaps letters; a
one-point contour at x = 0 in every glyph (draws nothing) makes the ink box start at the
pen, so the bearing is kept.
"""
import sys

from fontTools import subset
from fontTools.ttLib import TTFont

src, out = sys.argv[1], sys.argv[2]
opts = subset.Options()
opts.layout_features = ["kern"]
opts.hinting = False
font = TTFont(src)
sub = subset.Subsetter(opts)
sub.populate(unicodes=list(range(0x20, 0x7F)) + list(range(0xA0, 0x100))
             + [0x2013, 0x2014, 0x2212, 0x2248, 0x00D7, 0x2190, 0x2191, 0x2192, 0x2193])
sub.subset(font)
glyf = font["glyf"]
for name in font.getGlyphOrder():
    g = glyf[name]
    if g.isComposite() or g.numberOfContours <= 0:
        continue
    g.coordinates.append((0, 0))
    g.flags.append(1)
    g.endPtsOfContours.append(len(g.coordinates) - 1)
    g.numberOfContours += 1
    g.recalcBounds(glyf)
    # The left side bearing is the glyph's xMin.
    adv, _ = font["hmtx"][name]
    font["hmtx"][name] = (adv, g.xMin)
font.save(out)
