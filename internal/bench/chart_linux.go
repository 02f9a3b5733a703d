//go:build linux

package bench

import (
	"fmt"
	"image/color"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
)

// writeChart draws the apply medians against N, ours solid and the
// floors dashed, one colour per backend, on a log time axis.
func writeChart(res *Results, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("egress-init apply time vs floor (median, %s, %d cores)", res.Machine.Date.Format("2006-01-02"), res.Machine.Cores)
	p.X.Label.Text = "excluded CIDRs (N), evenly spaced"
	p.Y.Label.Text = "ms per process (log scale)"
	p.Y.Scale = plot.LogScale{}
	var yt []plot.Tick
	for _, v := range []float64{0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000} {
		yt = append(yt, plot.Tick{Value: v, Label: fmt.Sprint(v)})
	}
	p.Y.Tick.Marker = plot.ConstantTicks(yt)
	// N grows by factors of 2 to 10: one slot per N reads better than a
	// linear axis that crowds 0, 100 and 1000 into a corner.
	var xt []plot.Tick
	for i, n := range res.Settings.ApplyNs {
		xt = append(xt, plot.Tick{Value: float64(i), Label: fmt.Sprint(n)})
	}
	p.X.Tick.Marker = plot.ConstantTicks(xt)
	p.X.Min, p.X.Max = -0.2, float64(len(res.Settings.ApplyNs)-1)+0.2
	p.Legend.Top = true
	p.Legend.Left = true
	p.Legend.XOffs = vg.Points(10)
	p.Add(plotter.NewGrid())
	colours := map[string]color.Color{
		"nftables":        color.RGBA{R: 0x1f, G: 0x77, B: 0xb4, A: 0xff},
		"iptables-nft":    color.RGBA{R: 0xd6, G: 0x27, B: 0x28, A: 0xff},
		"iptables-legacy": color.RGBA{R: 0x2c, G: 0xa0, B: 0x2c, A: 0xff},
	}
	for _, be := range Backends {
		for _, floor := range []bool{false, true} {
			var pts plotter.XYs
			name := be
			for i, n := range res.Settings.ApplyNs {
				r, ok := applyRow(res.Apply, be, floor, n)
				if !ok || r.Stats.Median <= 0 {
					continue
				}
				name = r.Variant
				if !floor {
					name = "egress-init " + be
				}
				pts = append(pts, plotter.XY{X: float64(i), Y: float64(r.Stats.Median.Microseconds()) / 1000})
			}
			if len(pts) == 0 {
				continue
			}
			l, s, err := plotter.NewLinePoints(pts)
			if err != nil {
				return err
			}
			l.Color, s.Color = colours[be], colours[be]
			l.Width = vg.Points(1.5)
			s.Shape = draw.CircleGlyph{}
			if floor {
				l.Dashes = []vg.Length{vg.Points(5), vg.Points(3)}
				s.Shape = draw.BoxGlyph{}
			}
			p.Add(l, s)
			p.Legend.Add(name, l, s)
		}
	}
	if err := p.Save(9*vg.Inch, 5.5*vg.Inch, path); err != nil {
		return err
	}
	// The same chart as PNG, for viewers that do not render SVG.
	return p.Save(9*vg.Inch, 5.5*vg.Inch, strings.TrimSuffix(path, ".svg")+".png")
}
