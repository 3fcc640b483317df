// squall.mjs: squall.js as an ES module.
//
//   import Squall from "/static/squall.mjs";          // or: import {Squall} from ...
//
// squall.js is a classic script that defines globalThis.Squall; importing it here
// runs it once as a module, and this file re-exports what it defined.
import "./squall.js";

const Squall = globalThis.Squall;
const {SquallError, topicMatches, backoffDelay} = Squall;

export {Squall, SquallError, topicMatches, backoffDelay};
export default Squall;
