// Entry point of the bundle tests/pages/whep_viewer.html loads: Eyevinn's WHEP
// player (@eyevinn/webrtc-player) behind one function, as window.whepPlayer.play.
import { WebRTCPlayer } from "@eyevinn/webrtc-player";

// Plays the WHEP endpoint `url` into `video`, authenticated as `token`'s user.
// Resolves once the offer is on its way; the returned player's unload() sends
// the viewer's DELETE.
export async function play(video, url, token) {
  const player = new WebRTCPlayer({
    video,
    type: "whep",
    // Its default is a public STUN server; the tests' network has only loopback.
    iceServers: [],
    // The publisher sends video only; an audio section would ask for what nobody sends.
    mediaConstraints: { videoOnly: true },
  });
  // The player sends this string as the Authorization header, verbatim.
  await player.load(new URL(url, location.href), `Bearer ${token}`);
  return player;
}
