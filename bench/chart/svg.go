package main

import (
	"bytes"
	"fmt"
	"html"
	"math"
	"strconv"
)

// canvas accumulates an SVG document.
type canvas struct {
	buf  bytes.Buffer
	w, h float64
}

func newCanvas(w, h float64, title string) *canvas {
	c := &canvas{w: w, h: h}
	fmt.Fprintf(&c.buf, `<svg xmlns="http://www.w3.org/2000/svg" width="%g" height="%g" viewBox="0 0 %g %g" font-family="Helvetica, Arial, sans-serif" font-size="12">`+"\n", w, h, w, h)
	fmt.Fprintf(&c.buf, `<rect width="%g" height="%g" fill="white"/>`+"\n", w, h)
	c.text(w/2, 22, "middle", 15, "bold", title)
	return c
}

func (c *canvas) text(x, y float64, anchor string, size float64, weight, s string) {
	fmt.Fprintf(&c.buf, `<text x="%.1f" y="%.1f" text-anchor="%s" font-size="%g" font-weight="%s">%s</text>`+"\n", x, y, anchor, size, weight, html.EscapeString(s))
}

func (c *canvas) line(x1, y1, x2, y2 float64, stroke string, width float64, dash bool) {
	d := ""
	if dash {
		d = ` stroke-dasharray="4 3"`
	}
	fmt.Fprintf(&c.buf, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="%g"%s/>`+"\n", x1, y1, x2, y2, stroke, width, d)
}

func (c *canvas) rect(x, y, w, h float64, fill string) {
	fmt.Fprintf(&c.buf, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>`+"\n", x, y, w, h, fill)
}

func (c *canvas) polyline(pts [][2]float64, stroke string) {
	fmt.Fprintf(&c.buf, `<polyline fill="none" stroke="%s" stroke-width="2" points="`, stroke)
	for _, p := range pts {
		fmt.Fprintf(&c.buf, "%.1f,%.1f ", p[0], p[1])
	}
	c.buf.WriteString(`"/>` + "\n")
	for _, p := range pts {
		fmt.Fprintf(&c.buf, `<circle cx="%.1f" cy="%.1f" r="3" fill="%s"/>`+"\n", p[0], p[1], stroke)
	}
}

func (c *canvas) bytes() []byte {
	c.buf.WriteString("</svg>\n")
	return c.buf.Bytes()
}

// series is one named set of values, one per category.
type series struct {
	name   string
	color  string
	values []float64
}

// panel is one chart inside a canvas: a frame at (x, y) of size w×h.
type panel struct {
	x, y, w, h float64
	title      string
	ylabel     string
	xlabel     string
	categories []string
}

// niceMax returns a round number at least v, and a tick step dividing it.
func niceMax(v float64) (top, step float64) {
	if v <= 0 {
		return 1, 0.25
	}
	mag := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10} {
		if m*mag >= v {
			top = m * mag
			break
		}
	}
	step = top / 4
	return top, step
}

// format prints an axis value compactly: 12k, 1.5k, 300.
func format(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'g', 3, 64) + "M"
	case v >= 1e3:
		return strconv.FormatFloat(v/1e3, 'g', 3, 64) + "k"
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

// frame draws p's title, axes, horizontal grid and labels for values up to
// top, and returns the function mapping a value to a y coordinate.
func (c *canvas) frame(p panel, top, step float64) func(float64) float64 {
	const left, bottom = 56, 40
	ox, oy := p.x+left, p.y+p.h-bottom
	ph := p.h - bottom - 30
	y := func(v float64) float64 { return oy - v/top*ph }
	c.text(p.x+p.w/2, p.y+14, "middle", 13, "bold", p.title)
	for v := 0.0; v <= top*1.0001; v += step {
		c.line(ox, y(v), p.x+p.w-10, y(v), "#ddd", 1, false)
		c.text(ox-6, y(v)+4, "end", 11, "normal", format(v))
	}
	c.line(ox, oy, p.x+p.w-10, oy, "#333", 1, false)
	c.line(ox, oy, ox, y(top), "#333", 1, false)
	fmt.Fprintf(&c.buf, `<text transform="translate(%.1f,%.1f) rotate(-90)" text-anchor="middle" font-size="11">%s</text>`+"\n",
		p.x+12, p.y+30+ph/2, html.EscapeString(p.ylabel))
	if p.xlabel != "" {
		c.text(ox+(p.w-left-10)/2, p.y+p.h-4, "middle", 11, "normal", p.xlabel)
	}
	return y
}

// bars draws grouped bars: one group per category, one bar per series,
// each labelled with its value.
func (c *canvas) bars(p panel, ss []series) {
	top := 0.0
	for _, s := range ss {
		for _, v := range s.values {
			top = math.Max(top, v)
		}
	}
	top, step := niceMax(top * 1.1)
	y := c.frame(p, top, step)
	const left = 56
	plotW := p.w - left - 10
	groupW := plotW / float64(len(p.categories))
	barW := groupW * 0.7 / float64(len(ss))
	for i, cat := range p.categories {
		gx := p.x + left + float64(i)*groupW + groupW*0.15
		for j, s := range ss {
			v := s.values[i]
			bx := gx + float64(j)*barW
			c.rect(bx, y(v), barW-2, y(0)-y(v), s.color)
			c.text(bx+(barW-2)/2, y(v)-4, "middle", 10, "normal", format(v))
		}
		c.text(gx+barW*float64(len(ss))/2, y(0)+16, "middle", 12, "normal", cat)
	}
	if len(ss) > 1 {
		c.legend(p.x+p.w-130, p.y+26, ss)
	}
}

// lines draws one polyline per series over evenly spaced categories.
func (c *canvas) lines(p panel, ss []series) {
	top := 0.0
	for _, s := range ss {
		for _, v := range s.values {
			top = math.Max(top, v)
		}
	}
	top, step := niceMax(top * 1.05)
	y := c.frame(p, top, step)
	const left = 56
	plotW := p.w - left - 30
	x := func(i int) float64 {
		if len(p.categories) == 1 {
			return p.x + left + plotW/2
		}
		return p.x + left + 10 + float64(i)*plotW/float64(len(p.categories)-1)
	}
	for i, cat := range p.categories {
		c.text(x(i), y(0)+16, "middle", 12, "normal", cat)
	}
	for _, s := range ss {
		var pts [][2]float64
		for i, v := range s.values {
			pts = append(pts, [2]float64{x(i), y(v)})
		}
		c.polyline(pts, s.color)
	}
	c.legend(p.x+left+14, p.y+40, ss)
}

func (c *canvas) legend(x, y float64, ss []series) {
	for i, s := range ss {
		yy := y + float64(i)*16
		c.rect(x, yy-9, 10, 10, s.color)
		c.text(x+14, yy, "start", 11, "normal", s.name)
	}
}
