package main

import (
	"fmt"
	"math"
	"slices"
	"time"
)

// series is a set of timings of one measurement.
type series []time.Duration

func (s series) sorted() series {
	c := slices.Clone(s)
	slices.Sort(c)
	return c
}

// quantile is the nearest-rank quantile (q in [0,1]); 0 when empty.
func (s series) quantile(q float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := s.sorted()
	i := int(math.Ceil(q*float64(len(c)))) - 1
	return c[max(0, min(i, len(c)-1))]
}

// median of an even count is the mean of the two middle values.
func (s series) median() time.Duration {
	if len(s) == 0 {
		return 0
	}
	c := s.sorted()
	n := len(c)
	if n%2 == 1 {
		return c[n/2]
	}
	return (c[n/2-1] + c[n/2]) / 2
}

func (s series) min() time.Duration { return s.quantile(0) }
func (s series) max() time.Duration { return s.quantile(1) }

// medianRange formats "median (min–max)".
func (s series) medianRange() string {
	if len(s) == 0 {
		return "—"
	}
	if len(s) == 1 {
		return fmtDur(s[0])
	}
	return fmt.Sprintf("%s (%s–%s)", fmtDur(s.median()), fmtDur(s.min()), fmtDur(s.max()))
}

// percentiles formats "p50 / p95 (min–max)".
func (s series) percentiles() string {
	if len(s) == 0 {
		return "—"
	}
	return fmt.Sprintf("p50 %s, p95 %s (min %s, max %s, n=%d)",
		fmtDur(s.quantile(0.5)), fmtDur(s.quantile(0.95)), fmtDur(s.min()), fmtDur(s.max()), len(s))
}

// fmtDur prints a duration in milliseconds with a precision fitting its size.
func fmtDur(d time.Duration) string {
	ms := float64(d) / float64(time.Millisecond)
	switch {
	case ms < 1:
		return fmt.Sprintf("%.3f ms", ms)
	case ms < 10:
		return fmt.Sprintf("%.2f ms", ms)
	case ms < 1000:
		return fmt.Sprintf("%.1f ms", ms)
	default:
		return fmt.Sprintf("%.2f s", ms/1000)
	}
}

// intRange formats "median (min–max)" of counts, or the value when all agree.
func intRange(v []int) string {
	if len(v) == 0 {
		return "—"
	}
	c := slices.Clone(v)
	slices.Sort(c)
	if c[0] == c[len(c)-1] {
		return fmt.Sprint(c[0])
	}
	return fmt.Sprintf("%d (%d–%d)", c[len(c)/2], c[0], c[len(c)-1])
}

// ratio formats a/b as "12.3×".
func ratio(a, b time.Duration) string {
	if a <= 0 || b <= 0 {
		return "—"
	}
	r := float64(a) / float64(b)
	if r >= 100 {
		return fmt.Sprintf("%.0f×", r)
	}
	return fmt.Sprintf("%.2f×", r)
}
