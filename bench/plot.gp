# hsm-driver bench --plot: throughput and efficiency against sessions.
# `hsm-driver bench --sweep ... --plot FILE.png` runs this very script (a
# copy is compiled into the binary, runtime/app/bench_report.cpp: keep the
# two the same). Use this file to re-plot a sweep from its --json output:
#
#   jq -r '.sweep.points[] | select(.efficiency != null)
#          | "\(.sessions) \(.e2e.ops_per_s) \(.ideal_ops_per_s) \(.efficiency)"' \
#     bench-results.json > sweep.dat
#   gnuplot -e "data='sweep.dat'; out='sweep.png'" bench/plot.gp
#
# Variables (set them with -e): data = a whitespace table with the columns
# sessions, ops/s, ideal ops/s, efficiency; out = the PNG to write;
# plot_title. Needs gnuplot with the pngcairo terminal (gnuplot-nox).
if (!exists("data")) data = 'sweep.dat'
if (!exists("out")) out = 'sweep.png'
if (!exists("plot_title")) plot_title = 'hsm-driver bench: sweep'
set terminal pngcairo size 960,600 noenhanced font ',11'
set output out
set title plot_title
set xlabel 'PKCS#11 sessions (--sessions)'
set logscale x 2
set logscale y 10
set ylabel 'requests/s (log scale)'
set y2label 'efficiency (achieved / ideal)'
set y2range [0:1.2]
set ytics nomirror
set y2tics 0.2
set grid
set key top left
plot data using 1:3 with lines dashtype 2 lw 2 \
       title 'ideal: sessions / HSM time', \
     data using 1:2 with linespoints lw 2 pt 7 title 'achieved', \
     data using 1:4 axes x1y2 with linespoints lw 2 pt 5 \
       title 'efficiency (right axis)'
