//go:build linux

package main

import (
	"bytes"
)

// The stream parser: an HTTP/1.1 body (chunked or not) carrying SSE, fed
// the bytes of each read as they come. It never needs a whole line or
// frame in memory: it keeps the first lineCap bytes of the current line,
// which is where the tool's own payload puts the fields it reads
// (run, part, seq, sent_ns), and the state of the current frame. No
// allocation per frame.

const lineCap = 512

// Frame kinds.
const (
	kindNone uint8 = iota
	kindComment
	kindSnapshot
	kindError
	kindEvent
)

// Chunked-decoder states.
const (
	chSize   uint8 = iota // reading the hex size line
	chExt                 // skipping a chunk extension up to LF
	chData                // cremain bytes of data
	chDataCR              // CR LF after the data
	chDataLF
	chDone // the last chunk was read
)

// frameSink receives whole frames from the parser.
type frameSink interface {
	frame(p *parser, now int64)
}

type parser struct {
	chunked bool
	cstate  uint8
	csize   int64
	cremain int64
	bodyEnd bool // the zero-size chunk arrived: the relay ended the stream

	line    [lineCap]byte
	lineLen int // bytes kept of the current line (at most lineCap)

	// The frame being read.
	kind    uint8
	hasData bool
	fOK     bool // the data line held the tool's fields
	fRun    bool // ... with this run's id
	fPart   int64
	fSeq    int64
	fSent   int64

	runID []byte // `"run":"<id>"` needle of this run
	// centrifugo: the stream is Centrifugo's uni_sse, whose frames have no
	// event line; the data line's JSON says the kind (see centrifugoKind).
	centrifugo bool
	sink       frameSink

	badChunk bool
}

// The needles follow the producer's order, so each is normally a prefix of
// what is left; the run's starts with '{', rare in a data line, which the
// search skips to quickly.
var (
	needleRun  = []byte(`{"run":"`)
	needlePart = []byte(`","part":`)
	needleSeq  = []byte(`,"seq":`)
	needleSent = []byte(`,"sent_ns":`)
	prefEvent  = []byte("event: ")
	prefData   = []byte("data: ")
	evSnapshot = []byte("snapshot")
	evError    = []byte("error")
)

// feed consumes bytes of the HTTP body received at now (unix ns).
func (p *parser) feed(b []byte, now int64) {
	if !p.chunked {
		p.sse(b, now)
		return
	}
	for len(b) > 0 {
		switch p.cstate {
		case chSize:
			c := b[0]
			b = b[1:]
			switch {
			case c >= '0' && c <= '9':
				p.csize = p.csize<<4 | int64(c-'0')
			case c >= 'a' && c <= 'f':
				p.csize = p.csize<<4 | int64(c-'a'+10)
			case c >= 'A' && c <= 'F':
				p.csize = p.csize<<4 | int64(c-'A'+10)
			case c == '\r', c == ';', c == ' ', c == '\t':
				p.cstate = chExt
			case c == '\n':
				p.endSize()
			default:
				p.badChunk = true
				p.cstate = chDone
			}
		case chExt:
			i := bytes.IndexByte(b, '\n')
			if i < 0 {
				return
			}
			b = b[i+1:]
			p.endSize()
		case chData:
			n := int64(len(b))
			if n > p.cremain {
				n = p.cremain
			}
			p.sse(b[:n], now)
			b = b[n:]
			p.cremain -= n
			if p.cremain == 0 {
				p.cstate = chDataCR
			}
		case chDataCR:
			if b[0] == '\r' {
				b = b[1:]
				p.cstate = chDataLF
				continue
			}
			fallthrough
		case chDataLF:
			if b[0] == '\n' {
				b = b[1:]
				p.cstate = chSize
				p.csize = 0
				continue
			}
			p.badChunk = true
			p.cstate = chDone
		case chDone:
			return
		}
	}
}

func (p *parser) endSize() {
	if p.csize == 0 {
		p.bodyEnd = true
		p.cstate = chDone
		return
	}
	p.cremain = p.csize
	p.csize = 0
	p.cstate = chData
}

// sse consumes body bytes. A line that arrived whole is read where it is;
// only one split across reads is kept.
func (p *parser) sse(b []byte, now int64) {
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			p.keep(b)
			return
		}
		if p.lineLen == 0 {
			p.endLine(b[:min(i, lineCap)], now)
		} else {
			p.keep(b[:i])
			p.endLine(p.line[:p.lineLen], now)
		}
		p.lineLen = 0
		b = b[i+1:]
	}
}

func (p *parser) keep(b []byte) {
	if room := lineCap - p.lineLen; room > 0 {
		if len(b) > room {
			b = b[:room]
		}
		p.lineLen += copy(p.line[p.lineLen:], b)
	}
}

func (p *parser) endLine(l []byte, now int64) {
	if n := len(l); n > 0 && l[n-1] == '\r' {
		l = l[:n-1]
	}
	switch {
	case len(l) == 0:
		if p.kind != kindNone || p.hasData {
			if p.kind == kindNone {
				p.kind = kindEvent // data without an event line: "message"
			}
			p.sink.frame(p, now)
		}
		p.kind, p.hasData, p.fOK, p.fRun = kindNone, false, false, false
		p.fPart, p.fSeq, p.fSent = 0, 0, 0
	case l[0] == ':':
		if p.kind == kindNone {
			p.kind = kindComment
		}
	case bytes.HasPrefix(l, prefEvent):
		name := l[len(prefEvent):]
		switch {
		case bytes.Equal(name, evSnapshot):
			p.kind = kindSnapshot
		case bytes.Equal(name, evError):
			p.kind = kindError
		default:
			p.kind = kindEvent
		}
	case bytes.HasPrefix(l, prefData):
		p.hasData = true
		d := l[len(prefData):]
		if p.centrifugo {
			p.kind = centrifugoKind(d)
		}
		p.fields(d)
	}
	// id: and retry: lines carry nothing the tool measures.
}

// Centrifugo's uni_sse frames are one data line each: a push object whose
// first key says what it is.
var (
	cfPing       = []byte(`{}`)
	cfConnect    = []byte(`{"connect":`)
	cfDisconnect = []byte(`{"disconnect":`)
)

// centrifugoKind classifies a uni_sse data line: the connect reply stands
// for the relay's snapshot (the stream is set up), an empty object is
// Centrifugo's ping (its keepalive), a disconnect the relay's error event,
// and anything else a publication, whose data is the record value.
func centrifugoKind(d []byte) uint8 {
	switch {
	case bytes.Equal(d, cfPing):
		return kindComment
	case bytes.HasPrefix(d, cfConnect):
		return kindSnapshot
	case bytes.HasPrefix(d, cfDisconnect):
		return kindError
	}
	return kindEvent
}

// fields reads run, part, seq and sent_ns from the start of a data line.
func (p *parser) fields(d []byte) {
	i := bytes.Index(d, needleRun)
	if i < 0 {
		return
	}
	d = d[i+len(needleRun):]
	p.fRun = len(p.runID) > 0 && bytes.HasPrefix(d, p.runID)
	if j := bytes.IndexByte(d, '"'); j >= 0 {
		d = d[j:]
	}
	var ok1, ok2, ok3 bool
	p.fPart, d, ok1 = numberAfter(d, needlePart)
	p.fSeq, d, ok2 = numberAfter(d, needleSeq)
	p.fSent, _, ok3 = numberAfter(d, needleSent)
	p.fOK = ok1 && ok2 && ok3
}

func numberAfter(d, needle []byte) (int64, []byte, bool) {
	i := 0
	if !bytes.HasPrefix(d, needle) {
		if i = bytes.Index(d, needle); i < 0 {
			return 0, d, false
		}
	}
	d = d[i+len(needle):]
	neg := false
	if len(d) > 0 && d[0] == '-' {
		neg = true
		d = d[1:]
	}
	var v int64
	n := 0
	for n < len(d) && d[n] >= '0' && d[n] <= '9' {
		v = v*10 + int64(d[n]-'0')
		n++
	}
	if n == 0 || n == len(d) { // no digits, or cut off at the end of what was kept
		return 0, d, false
	}
	if neg {
		v = -v
	}
	return v, d[n:], true
}
