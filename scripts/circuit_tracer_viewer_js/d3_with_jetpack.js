// d3 v7 with d3-jetpack on the same d3-selection, as the global `d3` that
// circuit-tracer's viewer expects (it loads d3 and a 2024 d3-jetpack from a CDN).
import * as d3 from "d3";
import * as jetpack from "d3-jetpack";

// The 2024 jetpack's conventions() object also draws its axes: c.drawAxis(svg).
function conventions(options) {
  const c = jetpack.conventions(options);
  c.drawAxis = (svg) => jetpack.drawAxis(Object.assign({}, c, {svg: svg || c.svg}));
  return c;
}
window.d3 = Object.assign({}, d3, jetpack, {conventions});
